"""The kernel backends: which one runs a call, and the registration of their ops with torch.library.

Backends: "cpp" (the C++ extension trd_fast._C, CPU tensors), "triton" (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "torch" (trd_fast.reference, any device), and "auto", which picks one per device.

Every kernel backend provides the same six ops with the same schemas and semantics (schemas in csrc/ops.cpp),
named trd_fast::<name> for "cpp" and trd_fast::<name>_triton for "triton":

  divergence(student [Bs,Ls,Vs], teacher [Bt,Lt,Vt], kind, beta, temperature, inplace_backward)
      -> value [Bs,Ls] fp32, stats [Bs,Ls,3] fp64  (row r = b * L + l on each side; Bs Ls == Bt Lt)
  divergence_backward(grad_value [Bs,Ls], student, teacher, value, stats, kind, beta, temperature) -> [Bs,Ls,Vs]
  divergence_backward_(...same...) -> ()  writes the gradient over `student`
  token_logprobs(logits [B,L,V], token_ids [B,L], temperature) -> logprobs [B,L] fp32, lse [B,L] fp64
  token_logprobs_backward(grad [B,L], logits, token_ids, lse, temperature) -> [B,L,V]
  prefix_scan(signal [B,L], lengths [B], threshold, window) -> cumsum [B,L], first [B] int64

register() is the one registration step, run once by `import trd_fast.ops`: it loads the extension (refusing
one built for a SIMD level this CPU lacks), registers the C++ ops' fakes and autograd, defines the fused linear
ops (fused_linear_ops.py, Python ops over the kernel backends), and, where Triton can run (CUDA, or
TRITON_INTERPRET=1) and TRD_FAST_NO_TRITON is not 1, defines the Triton ops and their autograd up front, so
that torch.compile never traces an import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}
TRITON_MODULE = "trd_fast.ops.triton_ops"

EXTENSION = None  # the loaded trd_fast._C, or None
EXTENSION_MISSING: str | None = "trd_fast.ops.registry.register() has not run"  # why EXTENSION is None
_registered = False
_triton_defined = False
_libraries: list = []  # the torch.library fragments this module defined ops in (kept alive: they own them)
_warned = False


# ---------------------------------------------------------------------------------------------- op sets

@dataclass(frozen=True)
class OpSet:
    suffix: str  # op names are trd_fast::<name><suffix>

    def op(self, name: str):
        return getattr(torch.ops.trd_fast, name + self.suffix)

    def qualname(self, name: str) -> str:
        return f"trd_fast::{name}{self.suffix}"


CPP_OPS = OpSet(suffix="")
TRITON_OPS = OpSet(suffix="_triton")


def opset(name: str) -> OpSet:
    """"cpp" -> the C++ ops, "triton" -> the Triton ops (defined on first use when register() did not)."""
    if name == "cpp":
        return CPP_OPS
    if not _triton_defined:
        _define_triton_ops()
    return TRITON_OPS


# The dtype of the saved row statistics (log-normalizers), fp64 for every logit dtype: the backward subtracts them
# in two steps, and fp32 would limit every log p to ~ulp(logits / T) (5e-4 near 1e4).
STATS_DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------- the extension

def isa_refusal(built: str, here: str) -> str | None:
    """Why an extension built for SIMD level `built` must not run on a CPU of level `here`, or None."""
    if ISA_RANK.get(built, 0) <= ISA_RANK.get(here, 0):
        return None
    return (f"trd_fast._C was built for {built} but this CPU supports {here}: reinstall with "
            f"TRD_FAST_CPU_ISA={here if here in ISA_RANK else 'default'}")


def _load_extension():
    """trd_fast._C if it is built and its SIMD level runs on this CPU, else None (and why)."""
    try:
        from trd_fast import _C
    except ImportError as error:
        return None, f"the C++ extension trd_fast._C is not built ({error})"
    refusal = isa_refusal(_C.cpu_isa(), torch.backends.cpu.get_cpu_capability().lower())
    return (None, refusal) if refusal else (_C, None)


# ---------------------------------------------------------------------------------------------- Triton

def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once: resolve() runs inside torch.compile'd code, and torch 2.11's dynamo refuses to trace find_spec
# (a graph break, an error under fullgraph=True; seen on an H200).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_runnable() -> bool:
    """Triton is installed, can run here (CUDA or the interpreter) and is not turned off (TRD_FAST_NO_TRITON)."""
    return (TRITON_INSTALLED and (triton_interpreted() or torch.cuda.is_available())
            and os.environ.get("TRD_FAST_NO_TRITON", "0") != "1")


def _define_triton_ops() -> None:
    """Defines trd_fast::<name>_triton from the implementations in triton_ops.py, with their autograd."""
    global _triton_defined
    module = importlib.import_module(TRITON_MODULE)
    for name, (implementation, mutates_args) in module.IMPLEMENTATIONS.items():
        torch.library.triton_op(TRITON_OPS.qualname(name), implementation, mutates_args=mutates_args)
    _register_autograd(TRITON_OPS)
    _triton_defined = True


# ---------------------------------------------------------------------------------------------- registration

def register() -> None:
    """The registration step (idempotent): extension, C++ fakes and autograd, the Triton ops where runnable."""
    global EXTENSION, EXTENSION_MISSING, _registered
    if _registered:
        return
    _registered = True
    EXTENSION, EXTENSION_MISSING = _load_extension()
    if EXTENSION is not None:
        _register_fakes(CPP_OPS)
        _register_autograd(CPP_OPS)
    from trd_fast.ops import fused_linear_ops  # it runs on the OpSets above

    _libraries.append(torch.library.Library("trd_fast", "FRAGMENT"))
    fused_linear_ops.define(_libraries[-1])
    if triton_runnable():
        _define_triton_ops()


def _register_fakes(ops: OpSet) -> None:
    """Shape-only implementations of the C++ ops, for torch.compile and opcheck (a triton_op is its own)."""

    @torch.library.register_fake(ops.qualname("divergence"))
    def _(student, teacher, kind, beta, temperature, inplace_backward):
        lead = student.shape[:-1]
        return (student.new_empty(lead, dtype=torch.float32),
                student.new_empty((*lead, 3), dtype=STATS_DTYPE))

    @torch.library.register_fake(ops.qualname("divergence_backward"))
    def _(grad_value, student, teacher, value, stats, kind, beta, temperature):
        return student.new_empty(student.shape)

    @torch.library.register_fake(ops.qualname("divergence_backward_"))
    def _(grad_value, student, teacher, value, stats, kind, beta, temperature):
        return None

    @torch.library.register_fake(ops.qualname("token_logprobs"))
    def _(logits, token_ids, temperature):
        lead = logits.shape[:-1]
        return logits.new_empty(lead, dtype=torch.float32), logits.new_empty(lead, dtype=STATS_DTYPE)

    @torch.library.register_fake(ops.qualname("token_logprobs_backward"))
    def _(grad_logprobs, logits, token_ids, lse, temperature):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(ops.qualname("prefix_scan"))
    def _(signal, lengths, threshold, window):
        return signal.new_empty(signal.shape), lengths.new_empty(signal.shape[:1], dtype=torch.int64)


def _register_autograd(ops: OpSet) -> None:
    """Backward of divergence and token_logprobs: one sweep recomputing the gradient from saved row stats.

    The divergence's `inplace_backward` input is read here, not by the kernels: it picks divergence_backward_,
    which writes the gradient over the student logits. Their version counter is bumped after the write (a
    kernel writing through a data pointer is invisible to autograd), so that any other node that saved those
    logits for its own backward fails autograd's check instead of reading a gradient.
    """

    def divergence_setup(ctx, inputs, output):
        student, teacher, kind, beta, temperature, inplace_backward = inputs
        value, stats = output
        ctx.save_for_backward(student, teacher, value, stats)
        ctx.scalars = (kind, beta, temperature)
        ctx.inplace_backward = inplace_backward

    def divergence_backward(ctx, grad_value, grad_stats):
        student, teacher, value, stats = ctx.saved_tensors
        if grad_value is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad_value = grad_value.to(torch.float32).contiguous()
        if ctx.inplace_backward:
            ops.op("divergence_backward_")(grad_value, student, teacher, value, stats, *ctx.scalars)
            torch.autograd.graph.increment_version(student)
            grad = student
        else:
            grad = ops.op("divergence_backward")(grad_value, student, teacher, value, stats, *ctx.scalars)
        return grad, None, None, None, None, None

    torch.library.register_autograd(ops.qualname("divergence"), divergence_backward,
                                    setup_context=divergence_setup)

    def token_logprobs_setup(ctx, inputs, output):
        logits, token_ids, temperature = inputs
        ctx.save_for_backward(logits, token_ids, output[1])
        ctx.temperature = temperature

    def token_logprobs_backward(ctx, grad_logprobs, grad_lse):
        logits, token_ids, lse = ctx.saved_tensors
        if grad_logprobs is None or not ctx.needs_input_grad[0]:
            return None, None, None
        grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
        return ops.op("token_logprobs_backward")(grad_logprobs, logits, token_ids, lse, ctx.temperature), None, None

    torch.library.register_autograd(ops.qualname("token_logprobs"), token_logprobs_backward,
                                    setup_context=token_logprobs_setup)


# ---------------------------------------------------------------------------------------------- resolution

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
            return "triton" if TRITON_INSTALLED else "torch"
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
        if not TRITON_INSTALLED:
            raise ValueError("backend='triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA tensors; got tensors on {device}")
    return name
