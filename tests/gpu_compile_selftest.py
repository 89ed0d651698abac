"""Deliberately broken kernels: tests/gpu_compile.py must report each (its self-test, `--selftest`).

- branch_type_kernel: a variable that is an int on one side of a runtime `if` and a float on the other. The
  interpreter runs the Python and accepts it; Triton's compiler rejects it.
- spilling_kernel: a 4096-column fp64 tile on one warp keeps 2 x 128 fp64 values per thread live (512 32-bit
  registers, twice the 255 a thread may have): ptxas spills.
  The same kernel on a 256-column tile fits and must compile with no spill.
- scale: a helper called by the kernels, not a kernel itself (no compile case).
"""

import torch
import triton
import triton.language as tl

from gpu_compile import Case


@triton.jit
def scale(x, factor):
    return x * factor


@triton.jit
def branch_type_kernel(out_ptr, flag):
    if flag > 0:
        value = 1
    else:
        value = 1.5
    tl.store(out_ptr, scale(value, 2))


@triton.jit
def spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets).to(tl.float64)
    e = tl.exp(x - tl.max(x, 0))
    tl.store(out_ptr + offsets, scale(x * e, 1.0 / tl.sum(e, 0)))


def cases() -> dict:
    x, out = torch.empty(1, dtype=torch.float64), torch.empty(1, dtype=torch.float64)
    return {
        "gpu_compile_selftest.branch_type_kernel": [Case("int vs float", dict(out_ptr=out, flag=3))],
        "gpu_compile_selftest.spilling_kernel": [
            Case(f"{block} fp64, 1 warp", dict(x_ptr=x, out_ptr=out, BLOCK=block), launch=dict(num_warps=1))
            for block in (4096, 256)],
    }
