"""Build trd_fast and its kernel extension trd_fast._C.

Environment flags (read at build time):
  TRD_FAST_SKIP_EXT=1      build no extension: the torch-only package (the "torch" backend only).
  TRD_FAST_CPU_ISA         SIMD level of the C++ CPU kernels: avx512 | avx2 | default | auto (default: auto,
                           the build host's level as torch reports it). The extension refuses to load on a CPU
                           without that level, naming the flag to rebuild with.

The extension holds CPU kernels only (CUDA tensors run the Triton kernels), so the build needs no GPU and no nvcc.
"""

import glob
import os

from setuptools import setup

# Compiler flags and the ATen CPU_CAPABILITY macros for each SIMD level. ATen's at::vec::Vectorized runs
# scalar code unless CPU_CAPABILITY_<LEVEL> is defined, and the macros need the matching -m flags.
CPU_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cpu_isa() -> str:
    requested = os.environ.get("TRD_FAST_CPU_ISA", "auto").strip().lower()
    if requested != "auto":
        if requested not in CPU_ISA_FLAGS:
            raise SystemExit(f"TRD_FAST_CPU_ISA={requested!r}: expected one of avx512, avx2, default, auto")
        return requested
    import torch

    capability = torch.backends.cpu.get_cpu_capability().lower()  # "avx512" | "avx2" | "default" | ...
    return capability if capability in CPU_ISA_FLAGS else "default"


def extensions():
    from torch.utils.cpp_extension import CppExtension

    isa = cpu_isa()
    cxx = ["-O3", "-fopenmp", "-DTRD_FAST_CPU_ISA=\"" + isa + "\""] + CPU_ISA_FLAGS[isa]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    print(f"trd_fast: building trd_fast._C for CPU ISA {isa}")
    return [CppExtension("trd_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


if flag("TRD_FAST_SKIP_EXT"):
    setup()
else:
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
