"""The fused linear loss as torch.library custom ops over the row-block engine (fused_linear_blocks.py).

  trd_fast::fused_linear_loss      a scalar reduction ("mean" | "sum"): the loss, the per-row values and the
                                   student's gradients for an upstream gradient of 1, computed during the
                                   forward; the backward scales them by the upstream gradient.
  trd_fast::fused_linear_values    the per-row values [N] (reduction "none"), differentiable: the backward
                                   (trd_fast::fused_linear_values_backward) forms the logits again per block.

Every op takes the same description of the problem: the student head (hidden [N, H_s], weight [V_s, H_s],
bias [V_s] or None), the teacher head (hidden [N, H_t], weight [V_t, H_t], bias) or a SparseTeacher's ids and
log-probs [N, k], the logit scales and softcaps, the divergence kernel code, beta, temperature, top_k (already
clamped to the common vocabulary) and the kernel backend ("cpp" | "triton"). A gradient not wanted comes back
as an empty tensor. The fakes give shapes for torch.compile and opcheck.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trd_fast.ops.dispatch import opset
from trd_fast.ops.fused_linear_blocks import DEFAULT_TILE_BUDGET, TILE_BUDGET_BYTES, Engine, Gradients, Head, \
    Problem, Saved
from trd_fast.ops.reduction import mean_normalizer, mean_scale, reduce_values, reduction_gradient
from trd_fast.reference import compute_dtype


def _problem(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
             sparse_ids, sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap, kind,
             beta, temperature, top_k, backend) -> Problem:
    tensors = [t for t in (student_hidden, student_weight, teacher_hidden, teacher_weight, sparse_logprobs)
               if t is not None]
    dtype = compute_dtype(*tensors)
    student = Head.of(student_hidden, student_weight, student_bias, student_scale, student_softcap, dtype)
    if sparse_ids is not None:
        return Problem(student, None, sparse_ids, sparse_logprobs.detach().to(dtype), None, kind, beta, temperature,
                       student_weight.shape[0], dtype, opset(backend))
    teacher = Head.of(teacher_hidden, teacher_weight, teacher_bias, teacher_scale, teacher_softcap, dtype)
    columns = min(student_weight.shape[0], teacher_weight.shape[0])
    return Problem(student, teacher, None, None, top_k, kind, beta, temperature, columns, dtype, opset(backend))


def _engine(problem: Problem) -> Engine:
    device = problem.student.hidden.device.type
    return Engine(problem, TILE_BUDGET_BYTES.get(device, DEFAULT_TILE_BUDGET))


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _outputs(grads: Gradients, like: Tensor):
    return tuple(_empty(like) if g is None else g for g in (grads.hidden, grads.weight, grads.bias))


# ------------------------------------------------------------------------------------------------ the scalar loss

@torch.library.custom_op("trd_fast::fused_linear_loss", mutates_args=())
def fused_linear_loss(
        student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
        teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
        sparse_ids: Optional[Tensor], sparse_logprobs: Optional[Tensor], student_scale: float,
        teacher_scale: float, student_softcap: Optional[float], teacher_softcap: Optional[float], kind: int,
        beta: float, temperature: float, top_k: Optional[int], backend: str, weight: Optional[Tensor],
        normalizer: Optional[Tensor], clip: Optional[float], reduction: str,
        wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [] fp32, values [N] fp32, d loss / d student_hidden [N, H_s], d / d student_weight [V_s, H_s],
    d / d student_bias [V_s]) for an upstream gradient of 1; gradients in the compute dtype (fp32 or fp64),
    empty where not wanted ([hidden, weight, bias])."""
    problem = _problem(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       sparse_ids, sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap,
                       kind, beta, temperature, top_k, backend)
    values_like = student_hidden.new_empty((0,), dtype=torch.float32)
    if reduction == "mean":
        scale = mean_scale(mean_normalizer(weight, normalizer, problem.rows, values_like))
    else:
        scale = torch.ones((), dtype=torch.float32, device=student_hidden.device)

    def upstream(rows: slice, values: Tensor) -> Tensor:
        return reduction_gradient(values, clip=clip, weight=None if weight is None else weight[rows], scale=scale)

    grads = Gradients.zeros(problem, wanted) if any(wanted) else None
    saved = _engine(problem).forward(grads, upstream)
    loss = reduce_values(saved.values, clip=clip, weight=weight, normalizer=normalizer, reduction=reduction)
    return (loss, saved.values, *_outputs(grads or Gradients(None, None, None), student_hidden))


@fused_linear_loss.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sparse_ids,
      sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap, kind, beta, temperature,
      top_k, backend, weight, normalizer, clip, reduction, wanted):
    dtype = _fake_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, sparse_logprobs)
    grads = _fake_gradients(student_hidden, student_weight, student_bias, wanted, dtype)
    n = student_hidden.shape[0]
    return (student_hidden.new_empty((), dtype=torch.float32), student_hidden.new_empty((n,), dtype=torch.float32),
            *grads)


def _scaled(buffer: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * buffer in `dtype`; in eager mode in place over the buffer when the dtypes agree (no second [V, H]
    copy; a second backward through the same graph then fails autograd's saved-tensor version check). A traced
    backward (torch.compile, opcheck: functional tensors) gets the product out of place: a graph may not
    mutate a forward output it saved."""
    if buffer.dtype == dtype and type(buffer) is torch.Tensor and not torch.compiler.is_compiling():
        return buffer.mul_(grad)
    return (buffer * grad).to(dtype)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:3]]
    ctx.numel = [0 if t is None else t.numel() for t in inputs[:3]]


def _loss_backward(ctx, grad_loss, grad_values, *_):
    buffers = ctx.saved_tensors
    grads = [None, None, None]
    for i, buffer in enumerate(buffers):
        if ctx.needs_input_grad[i] and grad_loss is not None:
            if buffer.numel() == 0 and buffer.numel() != ctx.numel[i]:
                raise RuntimeError("trd_fast::fused_linear_loss: this gradient was not wanted in the forward")
            grads[i] = _scaled(buffer, grad_loss, ctx.dtypes[i])
    return (*grads, *([None] * 19))


torch.library.register_autograd("trd_fast::fused_linear_loss", _loss_backward, setup_context=_loss_setup)


# ------------------------------------------------------------------------------------------------ per-row values

@torch.library.custom_op("trd_fast::fused_linear_values", mutates_args=())
def fused_linear_values(
        student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
        teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
        sparse_ids: Optional[Tensor], sparse_logprobs: Optional[Tensor], student_scale: float,
        teacher_scale: float, student_softcap: Optional[float], teacher_softcap: Optional[float], kind: int,
        beta: float, temperature: float, top_k: Optional[int],
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(values [N] fp32, row statistics [N, 3], support ids [N, k] int64 and the teacher's logits there [N, k];
    k = 0 for the dense common columns) in the compute dtype."""
    problem = _problem(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       sparse_ids, sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap,
                       kind, beta, temperature, top_k, backend)
    saved = _engine(problem).forward()
    return saved.values, saved.stats, saved.ids, saved.teacher


@fused_linear_values.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sparse_ids,
      sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap, kind, beta, temperature,
      top_k, backend):
    dtype = _fake_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, sparse_logprobs)
    n = student_hidden.shape[0]
    k = sparse_ids.shape[1] if sparse_ids is not None else (top_k or 0)
    return (student_hidden.new_empty((n,), dtype=torch.float32), student_hidden.new_empty((n, 3), dtype=dtype),
            student_hidden.new_empty((n, k), dtype=torch.int64), student_hidden.new_empty((n, k), dtype=dtype))


@torch.library.custom_op("trd_fast::fused_linear_values_backward", mutates_args=())
def fused_linear_values_backward(
        grad_values: Tensor, values: Tensor, stats: Tensor, support_ids: Tensor, support_teacher: Tensor,
        student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
        teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
        sparse_ids: Optional[Tensor], sparse_logprobs: Optional[Tensor], student_scale: float,
        teacher_scale: float, student_softcap: Optional[float], teacher_softcap: Optional[float], kind: int,
        beta: float, temperature: float, top_k: Optional[int], backend: str,
        wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The student's gradients for grad_values [N] (compute dtype; empty where not wanted)."""
    problem = _problem(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       sparse_ids, sparse_logprobs, student_scale, teacher_scale, student_softcap, teacher_softcap,
                       kind, beta, temperature, top_k, backend)
    grads = Gradients.zeros(problem, wanted)
    saved = Saved(values, stats, support_ids, support_teacher)
    _engine(problem).backward(grad_values.to(torch.float32), saved, grads)
    return _outputs(grads, student_hidden)


@fused_linear_values_backward.register_fake
def _(grad_values, values, stats, support_ids, support_teacher, student_hidden, student_weight, student_bias,
      teacher_hidden, teacher_weight, teacher_bias, sparse_ids, sparse_logprobs, student_scale, teacher_scale,
      student_softcap, teacher_softcap, kind, beta, temperature, top_k, backend, wanted):
    dtype = _fake_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight, sparse_logprobs)
    return _fake_gradients(student_hidden, student_weight, student_bias, wanted, dtype)


def _values_setup(ctx, inputs, output):
    ctx.save_for_backward(*output, *inputs[:8])
    ctx.scalars = inputs[8:]


def _values_backward(ctx, grad_values, *_):
    wanted = list(ctx.needs_input_grad[:3])
    if grad_values is None or not any(wanted):
        return (None,) * 17
    values, stats, ids, teacher, *problem = ctx.saved_tensors
    grads = torch.ops.trd_fast.fused_linear_values_backward(grad_values, values, stats, ids, teacher, *problem,
                                                             *ctx.scalars, wanted)
    return (*(g.to(t.dtype) if w else None for g, t, w in zip(grads, problem[:3], wanted)), *([None] * 14))


torch.library.register_autograd("trd_fast::fused_linear_values", _values_backward, setup_context=_values_setup)


# ------------------------------------------------------------------------------------------------ fakes

def _fake_dtype(*tensors) -> torch.dtype:
    return compute_dtype(*(t for t in tensors if t is not None))


def _fake_gradients(hidden, weight, bias, wanted, dtype):
    empty = hidden.new_empty((0,), dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, dtype=dtype) if wanted[0] else empty,
            weight.new_empty(weight.shape, dtype=dtype) if wanted[1] else empty,
            weight.new_empty(weight.shape[:1], dtype=dtype) if wanted[2] and bias is not None else empty)
