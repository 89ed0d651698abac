"""Compile Triton kernels for a real GPU (sm_90, PTX and cubin through ptxas) on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, not Triton's compiler: it accepts kernels that the
compiler rejects (a variable whose type differs between the branches of a runtime `if`, ...) and never shows
register spills. This script imports trd_fast.kernels *compiled* (it must run without TRITON_INTERPRET), finds
every @triton.jit kernel of its modules, specializes each compile case of gpu_compile_cases exactly as a launch
on CUDA tensors would (Triton's own argument binder: dtypes, 16-byte alignment, strides equal to 1), compiles it
with triton.compile(ASTSource, GPUTarget("cuda", 90, 32)) and reads registers and spill bytes from ptxas's -v
log. A kernel is any @triton.jit function of a module that no other @triton.jit function of it calls (those are
helpers, compiled inside the kernels).

    python tests/gpu_compile.py OUT.json [--full] [--selftest] [--workers N]

writes {"kernels", "uncovered", "stale", "results", "candidates"}: the kernels found, those without a compile
case, cases without a kernel, one record per compilation (kernel, case, config, registers, spill bytes or
error), and each kernel's autotune candidates.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
from dataclasses import dataclass

TARGET = ("cuda", 90, 32)  # backend, compute capability (H100 / H200), warp size
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Case:
    label: str  # what the variant is, e.g. "jsd bf16/fp32"
    args: dict  # every non-config argument: tensors for pointers (only dtype and alignment matter), ints, floats
    every_config: bool = False  # compiled with every autotune candidate even in the representative set
    launch: dict | None = None  # launch options (num_warps, ...) of a kernel without autotuning; None: defaults


@dataclass(frozen=True)
class Job:
    kernel: str  # "module.function"
    case: Case
    config: object  # triton.Config of an autotuned kernel; None: a plain launch (Triton's default options)


def find_kernels(modules) -> dict:
    """{"module.function": (JITFunction, [Autotuner wrapping it, ...])} of the kernels defined in `modules`."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jitted = {id(v): (module, v) for module in modules for v in vars(module).values()
              if isinstance(v, JITFunction) and v.fn.__module__ == module.__name__}
    called = {id(callee) for _, fn in jitted.values() for name in fn.fn.__code__.co_names
              if isinstance(callee := fn.fn.__globals__.get(name), JITFunction)}
    kernels = {id(fn): (f"{module.__name__.rsplit('.', 1)[-1]}.{fn.fn.__qualname__}", fn, [])
               for key, (module, fn) in jitted.items() if key not in called}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Autotuner) and id(value.fn) in kernels:
                kernels[id(value.fn)][2].append(value)
    return {name: (fn, autotuners) for name, fn, autotuners in kernels.values()}


def project_modules() -> list:
    import trd_fast.kernels as package

    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def candidate_configs(autotuners, args: dict) -> list:
    """The autotune candidates a launch with `args` benchmarks (after the autotuner's own pruning)."""
    configs = []
    for tuner in autotuners:
        pruned = tuner.early_config_prune(tuner.configs, args) if tuner.early_config_prune else tuner.configs
        configs += [c for c in pruned if all(str(c) != str(seen) for seen in configs)]
    return configs


def values_per_thread(config) -> float:
    """Tile elements per thread: the register pressure a tile puts on one thread."""
    return math.prod(config.kwargs.values()) / (TARGET[2] * config.num_warps)


def plan(kernels: dict, cases: dict, full: bool) -> list:
    """Jobs: every case with every candidate (`full`), or the representative set: every case with its
    candidate of most values per thread (most warps on a tie: the fewest registers a thread may use), and the
    `every_config` cases with all candidates."""
    from triton import Config

    jobs = []
    for name, (kernel, autotuners) in kernels.items():
        for case in cases[name]:
            if not autotuners:
                jobs.append(Job(name, case, Config({}, **case.launch) if case.launch else None))
                continue
            configs = candidate_configs(autotuners, case.args)
            if not (full or case.every_config):
                configs = [max(configs, key=lambda c: (values_per_thread(c), c.num_warps))]
            jobs += [Job(name, case, config) for config in configs]
    return jobs


def compile_sm90(kernel, args: dict, config) -> dict:
    """Compile one specialization for sm_90: {"registers", "spill_bytes"} or {"error"} (first lines)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch_options = dict(config.all_kwargs() if config is not None else {}, debug=bool(kernel.debug))
    bound, specialization, options = binder(**args, **launch_options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch_options, bound, specialization,
                                                              options)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed to stdout by the compile
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                           options=options.__dict__)
    except Exception as error:  # any rejection by the frontend, the LLVM passes or ptxas is the finding
        lines = [line for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
        return {"error": "\n".join(lines[:1] + lines[1:][-6:])}  # the kind, and the message at the end
    spills, registers = SPILLS.search(log.getvalue()), REGISTERS.search(log.getvalue())
    if spills is None or registers is None:
        return {"error": f"no register / spill report in ptxas's log:\n{log.getvalue()[-2000:]}"}
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


KERNELS: dict = {}  # name -> (JITFunction, autotuners), filled in main before the worker processes fork
JOBS: list = []


def run_job(index: int) -> dict:
    job = JOBS[index]
    result = compile_sm90(KERNELS[job.kernel][0], job.case.args, job.config)
    config = "launch defaults" if job.config is None else str(job.config)
    return dict(kernel=job.kernel, case=job.case.label, config=config, **result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON report path")
    parser.add_argument("--full", action="store_true", help="every case with every autotune candidate")
    parser.add_argument("--selftest", action="store_true", help="also the deliberately broken kernels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("gpu_compile: unset TRITON_INTERPRET (the interpreter replaces @triton.jit kernels)")

    import gpu_compile_cases
    from triton import knobs

    modules = project_modules()
    cases = gpu_compile_cases.cases()
    if options.selftest:
        import gpu_compile_selftest

        modules.append(gpu_compile_selftest)
        cases.update(gpu_compile_selftest.cases())
    KERNELS.update(find_kernels(modules))
    uncovered = sorted(set(KERNELS) - set(cases))
    stale = sorted(set(cases) - set(KERNELS))
    JOBS.extend(plan({k: v for k, v in KERNELS.items() if k in cases}, cases, options.full))
    with tempfile.TemporaryDirectory(prefix="trd-gpu-compile-") as cache:
        knobs.cache.dir = cache  # nothing shared with other runs, nothing left behind
        with multiprocessing.get_context("fork").Pool(max(1, options.workers)) as pool:
            results = pool.map(run_job, range(len(JOBS)), chunksize=1)
    with open(options.out, "w") as f:
        json.dump(dict(kernels=sorted(KERNELS), uncovered=uncovered, stale=stale, results=results,
                       candidates={name: [str(c) for t in tuners for c in t.configs]
                                   for name, (_, tuners) in KERNELS.items()}), f, indent=1)


if __name__ == "__main__":
    main()
