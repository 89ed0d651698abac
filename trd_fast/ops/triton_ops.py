"""The Triton backend: implementations of the six kernel ops (see registry.py) over the launchers in kernels/.

registry.register() defines each as the torch.library.triton_op trd_fast::<name>_triton, with the schema and
semantics of the C++ op trd_fast::<name>, and registers their autograd. A triton_op is its own fake
implementation (torch.compile traces through it down to the wrap_triton launches). Under TRITON_INTERPRET=1
the interpreter runs the kernels on CPU tensors; torch.compile and opcheck of these ops need CUDA.

Numerics: fp32 math for fp32 / bf16 / fp16 inputs; fp64 math for float64 inputs (either divergence input).
"""

import contextlib

import torch
import triton

from trd_fast.dependencies import check_version

check_version("triton", triton.__version__, "trd_fast's Triton backend")

from trd_fast.constants import FLOAT_DTYPES  # noqa: E402
from trd_fast.kernels import (check_token_ids, divergence_backward, divergence_forward, segmented_scan,  # noqa: E402
                              token_logprobs_backward, token_logprobs_forward)
from trd_fast.ops import checks  # noqa: E402
from trd_fast.ops.registry import STATS_DTYPE  # noqa: E402


def _device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _check_rows(name: str, x: torch.Tensor) -> None:
    checks.float_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name}: expected shape [B, L, V], got {tuple(x.shape)}")


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Student [Bs, Ls, Vs] and teacher [Bt, Lt, Vt] rows: each side its own [B, L] split of the same rows."""
    _check_rows("student", student)
    _check_rows("teacher", teacher)
    if student.shape[0] * student.shape[1] != teacher.shape[0] * teacher.shape[1]:
        raise ValueError(f"teacher: {teacher.shape[0] * teacher.shape[1]} rows {tuple(teacher.shape[:2])} but "
                         f"student has {student.shape[0] * student.shape[1]} {tuple(student.shape[:2])}")
    if teacher.device != student.device:
        raise ValueError(f"teacher: on {teacher.device} but student is on {student.device}")


def _per_row(name: str, x: torch.Tensor, lead, dtype=None) -> torch.Tensor:
    """A small per-row tensor [B, L] (or [B, L, 3]) as a contiguous tensor of `dtype` (no-op when it is one)."""
    if tuple(x.shape[:2]) != tuple(lead):
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match the rows {tuple(lead)}")
    return x.to(dtype or x.dtype).contiguous()


def divergence_triton(student: torch.Tensor, teacher: torch.Tensor, kind: int, beta: float, temperature: float,
                      inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """value [B, L] fp32 and stats [B, L, 3] fp64 = (A, B, K) over the common columns; see kernels/divergence.py."""
    _check_pair(student, teacher)
    lead = student.shape[:2]
    value = student.new_empty(lead, dtype=torch.float32)
    stats = student.new_empty((*lead, 3), dtype=STATS_DTYPE)
    with _device_guard(student):
        divergence_forward(student, teacher, value, stats, kind, beta, temperature)
    return value, stats


def _backward_inputs(grad_value, student, teacher, value, stats):
    _check_pair(student, teacher)
    lead = student.shape[:2]
    return (_per_row("grad_value", grad_value, lead, torch.float32), _per_row("value", value, lead, torch.float32),
            _per_row("stats", stats, lead))


def divergence_backward_triton(grad_value: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                               value: torch.Tensor, stats: torch.Tensor, kind: int, beta: float,
                               temperature: float) -> torch.Tensor:
    """The gradient w.r.t. student: a new contiguous [B, L, Vs] tensor in the student dtype."""
    grad_value, value, stats = _backward_inputs(grad_value, student, teacher, value, stats)
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    with _device_guard(student):
        divergence_backward(grad_value, student, teacher, value, stats, out, kind, beta, temperature)
    return out


def divergence_backward__triton(grad_value: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                                value: torch.Tensor, stats: torch.Tensor, kind: int, beta: float,
                                temperature: float) -> None:
    """The gradient w.r.t. student written over `student` itself (its strided rows), row by row."""
    grad_value, value, stats = _backward_inputs(grad_value, student, teacher, value, stats)
    with _device_guard(student):
        divergence_backward(grad_value, student, teacher, value, stats, student, kind, beta, temperature)


def token_logprobs_triton(logits: torch.Tensor, token_ids: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs [B, L] fp32 (0 where id == -100) and lse [B, L] fp64 of logits / T."""
    _check_rows("logits", logits)
    lead = logits.shape[:2]
    ids = _per_row("token_ids", token_ids, lead, torch.int64)
    logprobs = logits.new_empty(lead, dtype=torch.float32)
    lse = logits.new_empty(lead, dtype=STATS_DTYPE)
    with _device_guard(logits):
        if logits.device.type == "cuda":
            check_token_ids(ids, logits.shape[2])  # device-side assert; exact CPU checks run above us
        token_logprobs_forward(logits, ids, logprobs, lse, temperature)
    return logprobs, lse


def token_logprobs_backward_triton(grad_logprobs: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor,
                                   lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """The gradient w.r.t. logits: a new contiguous [B, L, V] tensor in the logits dtype."""
    _check_rows("logits", logits)
    lead = logits.shape[:2]
    grad = _per_row("grad_logprobs", grad_logprobs, lead, torch.float32)
    ids = _per_row("token_ids", token_ids, lead, torch.int64)
    lse = _per_row("lse", lse, lead)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    with _device_guard(logits):
        token_logprobs_backward(grad, logits, ids, lse, out, temperature)
    return out


def prefix_scan_triton(signal: torch.Tensor, lengths: torch.Tensor, threshold: float,
                       window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cumsum [B, L] (signal dtype) and first [B] int64; see kernels/prefix_scan.py."""
    if signal.dim() != 2 or signal.dtype not in FLOAT_DTYPES:
        raise ValueError(f"signal: expected a float tensor [B, L], got {signal.dtype} {tuple(signal.shape)}")
    if tuple(lengths.shape) != tuple(signal.shape[:1]):
        raise ValueError(f"lengths: shape {tuple(lengths.shape)} does not match the batch {signal.shape[0]}")
    if window < 1:
        raise ValueError(f"window: expected an integer >= 1, got {window}")
    lengths = lengths.to(torch.int64).contiguous()
    cumsum = torch.empty(signal.shape, dtype=signal.dtype, device=signal.device)
    first = torch.empty(signal.shape[:1], dtype=torch.int64, device=signal.device)
    with _device_guard(signal):
        segmented_scan(signal, lengths, cumsum, first, threshold, window)
    return cumsum, first



# name -> (implementation, the arguments it writes), defined by registry.register() as trd_fast::<name>_triton
IMPLEMENTATIONS = {
    "divergence": (divergence_triton, ()),
    "divergence_backward": (divergence_backward_triton, ()),
    "divergence_backward_": (divergence_backward__triton, ("student",)),
    "token_logprobs": (token_logprobs_triton, ()),
    "token_logprobs_backward": (token_logprobs_backward_triton, ()),
    "prefix_scan": (prefix_scan_triton, ()),
}
