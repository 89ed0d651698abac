"""Backend choice: "auto" | "cpp" | "triton" | "torch", by argument, TRD_FAST_BACKEND, or the device."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}


def _load_extension():
    """trd_fast._C if it is built and its SIMD level runs on this CPU, else None (and why)."""
    try:
        from trd_fast import _C
    except ImportError as error:
        return None, f"the C++ extension trd_fast._C is not built ({error})"
    refusal = isa_refusal(_C.cpu_isa(), torch.backends.cpu.get_cpu_capability().lower())
    return (None, refusal) if refusal else (_C, None)


def isa_refusal(built: str, here: str) -> str | None:
    """Why an extension built for SIMD level `built` must not run on a CPU of level `here`, or None."""
    if ISA_RANK.get(built, 0) <= ISA_RANK.get(here, 0):
        return None
    return (f"trd_fast._C was built for {built} but this CPU supports {here}: reinstall with "
            f"TRD_FAST_CPU_ISA={here if here in ISA_RANK else 'default'}")


EXTENSION, EXTENSION_MISSING = _load_extension()
_warned = False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"trd_fast: using the torch reference backend on CPU: {EXTENSION_MISSING}", stacklevel=3)


def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend ("cpp" | "triton" | "torch") for tensors on `device`."""
    name = backend if backend is not None else os.environ.get("TRD_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "TRD_FAST_BACKEND"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_installed() else "torch"
        if device.type == "cpu" and EXTENSION is not None:
            return "cpp"
        if device.type == "cpu":
            _warn_fallback()
        return "torch"
    if name == "cpp":
        if EXTENSION is None:
            raise ValueError(f"backend='cpp' is unavailable: {EXTENSION_MISSING}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors; got tensors on {device}")
    if name == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA tensors; got tensors on {device}")
    return name
