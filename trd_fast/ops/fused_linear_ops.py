"""The fused linear loss as torch.library ops over the row-block engine (fused_linear_blocks.py).

  trd_fast::fused_linear_loss      a scalar reduction ("mean" | "sum"): the loss, the per-row values and the
                                   student's gradients for an upstream gradient of 1, computed during the
                                   forward; the backward scales them by the upstream gradient.
  trd_fast::fused_linear_values    the per-row values [N] (reduction "none"), differentiable: the backward
                                   (trd_fast::fused_linear_values_backward) forms the logits again per block.

Every op takes the same description of the problem (PROBLEM): the student head (hidden [N, H_s], weight
[V_s, H_s], bias [V_s] or None), the teacher head (hidden [N, H_t], weight [V_t, H_t], bias) or a
SparseTeacher's ids and log-probs [N, k], the logit scales and softcaps, the divergence kernel code, beta,
temperature, top_k (already clamped to the common vocabulary) and the kernel backend ("cpp" | "triton"). A
gradient not wanted comes back as an empty tensor; gradients are in the compute dtype (fp32, fp64 for float64
inputs). registry.register() defines the ops (define() below: torch.library.define, so no import of
torch._dynamo on the first call); the fakes give shapes for torch.compile and opcheck.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trd_fast.constants import DIVERGENCES
from trd_fast.ops.fused_linear_blocks import DEFAULT_TILE_BUDGET, TILE_BUDGET_BYTES, Engine, Gradients, Head, \
    Problem, Saved
from trd_fast.ops.reduction import mean_normalizer, mean_scale, reduce_values, reduction_gradient
from trd_fast.ops.registry import STATS_DTYPE, opset
from trd_fast.reference import compute_dtype

PROBLEM = ("Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
           "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? sparse_ids, Tensor? sparse_logprobs, "
           "float student_scale, float teacher_scale, float? student_softcap, float? teacher_softcap, int kind, "
           "float beta, float temperature, int? top_k, str backend")
PROBLEM_ARGS = PROBLEM.count(",") + 1
SAVED = "Tensor values, Tensor stats, Tensor support_ids, Tensor support_teacher"
SCHEMAS = {
    "fused_linear_loss": f"({PROBLEM}, Tensor? weight, Tensor? normalizer, float? clip, str reduction, bool[] wanted) "
                         "-> (Tensor loss, Tensor values, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    "fused_linear_values": f"({PROBLEM}) -> ({SAVED})",
    "fused_linear_values_backward": f"(Tensor grad_values, {SAVED}, {PROBLEM}, bool[] wanted) -> "
                                    "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
}


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


def dense_rows_per_block(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, budget_bytes: int) -> int:
    """Rows per block of a dense call on these hidden states [N, H] and heads [V, H] (no bias, scale, softcap or
    top-k) when its tiles may take `budget_bytes`: what each block's projections hold (for benchmarks)."""
    return _problem(student_hidden, student_weight, None, teacher_hidden, teacher_weight, None, None, None, 1.0, 1.0,
                    None, None, DIVERGENCES.index("forward_kl"), 0.5, 1.0, None, "cpp").row_block(budget_bytes)


def _engine(problem: Problem) -> Engine:
    device = problem.student.hidden.device.type
    return Engine(problem, TILE_BUDGET_BYTES.get(device, DEFAULT_TILE_BUDGET))


def _outputs(grads: Gradients, like: Tensor):
    empty = like.new_empty((0,), dtype=torch.float32)
    return tuple(empty if g is None else g for g in (grads.hidden, grads.weight, grads.bias))


# ------------------------------------------------------------------------------------------------ the scalar loss

def fused_linear_loss(*args):
    """(loss [] fp32, values [N] fp32, d loss / d student_hidden [N, H_s], d / d student_weight [V_s, H_s],
    d / d student_bias [V_s]) for an upstream gradient of 1, each gradient empty where not wanted."""
    weight, normalizer, clip, reduction, wanted = args[PROBLEM_ARGS:]
    problem = _problem(*args[:PROBLEM_ARGS])
    hidden = problem.student.hidden
    if reduction == "mean":
        scale = mean_scale(mean_normalizer(weight, normalizer, problem.rows, hidden))
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)

    def upstream(rows: slice, values: Tensor) -> Tensor:
        return reduction_gradient(values, clip=clip, weight=None if weight is None else weight[rows], scale=scale)

    grads = Gradients.allocate(problem, wanted)
    saved = _engine(problem).forward(grads if any(wanted) else None, upstream)
    loss = reduce_values(saved.values, clip=clip, weight=weight, normalizer=normalizer, reduction=reduction)
    return (loss, saved.values, *_outputs(grads, hidden))


def _fake_loss(*args):
    hidden, wanted = args[0], args[-1]
    grads = _fake_gradients(args, wanted)
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[:1], dtype=torch.float32),
            *grads)


def _scaled(buffer: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * buffer in `dtype`; in eager mode in place over the buffer when the dtypes agree (no second [V, H]
    copy; a second backward through the same graph then fails autograd's saved-tensor version check). A traced
    backward (torch.compile, opcheck: functional tensors) gets the product out of place: a graph may not
    mutate a forward output it saved. An upstream gradient of exactly 1 on CPU (loss.backward()) leaves the
    buffer as it is: no pass over a [V, H] gradient."""
    if buffer.dtype == dtype and type(buffer) is torch.Tensor and not torch.compiler.is_compiling():
        if grad.device.type == "cpu" and grad.numel() == 1 and grad.item() == 1.0:
            return buffer
        return buffer.mul_(grad)
    return (buffer * grad).to(dtype)


def _loss_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else backward receives a zero-filled [V, H] for grad_weight
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
    return (*grads, *([None] * (PROBLEM_ARGS + 5 - 3)))



# ------------------------------------------------------------------------------------------------ per-row values

def fused_linear_values(*problem):
    """(values [N] fp32, row statistics [N, 3], support ids [N, k] int64 and the teacher's logits there [N, k];
    k = 0 for the dense common columns)."""
    saved = _engine(_problem(*problem)).forward()
    return saved.values, saved.stats, saved.ids, saved.teacher


def _fake_values(*problem):
    hidden, sparse_ids, top_k = problem[0], problem[6], problem[15]
    dtype = _fake_dtype(problem)
    n = hidden.shape[0]
    k = sparse_ids.shape[1] if sparse_ids is not None else (top_k or 0)
    return (hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n, 3), dtype=STATS_DTYPE),
            hidden.new_empty((n, k), dtype=torch.int64), hidden.new_empty((n, k), dtype=dtype))


def fused_linear_values_backward(grad_values, values, stats, support_ids, support_teacher, *args):
    """The student's gradients for grad_values [N] (each empty where not wanted)."""
    problem, wanted = _problem(*args[:PROBLEM_ARGS]), args[PROBLEM_ARGS]
    grads = Gradients.allocate(problem, wanted)
    saved = Saved(values, stats, support_ids, support_teacher)
    _engine(problem).backward(grad_values.to(torch.float32), saved, grads)
    return _outputs(grads, problem.student.hidden)


def _fake_values_backward(grad_values, values, stats, support_ids, support_teacher, *args):
    return _fake_gradients(args[:PROBLEM_ARGS], args[PROBLEM_ARGS])


def _values_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output, *inputs[:8])
    ctx.scalars = inputs[8:]


def _values_backward(ctx, grad_values, *_):
    wanted = list(ctx.needs_input_grad[:3])
    if grad_values is None or not any(wanted):
        return (None,) * PROBLEM_ARGS
    values, stats, ids, teacher, *problem = ctx.saved_tensors
    grads = torch.ops.trd_fast.fused_linear_values_backward(grad_values, values, stats, ids, teacher, *problem,
                                                             *ctx.scalars, wanted)
    return (*(g.to(t.dtype) if w else None for g, t, w in zip(grads, problem[:3], wanted)),
            *([None] * (PROBLEM_ARGS - 3)))



# ------------------------------------------------------------------------------------------------ fakes

def _fake_dtype(problem) -> torch.dtype:
    hidden, weight, _, teacher_hidden, teacher_weight, _, _, sparse_logprobs = problem[:8]
    return compute_dtype(*(t for t in (hidden, weight, teacher_hidden, teacher_weight, sparse_logprobs)
                           if t is not None))


def _fake_gradients(problem, wanted):
    hidden, weight, bias = problem[:3]
    dtype, empty = _fake_dtype(problem), hidden.new_empty((0,), dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, dtype=dtype) if wanted[0] else empty,
            weight.new_empty(weight.shape, dtype=dtype) if wanted[1] else empty,
            weight.new_empty(weight.shape[:1], dtype=dtype) if wanted[2] and bias is not None else empty)


# ------------------------------------------------------------------------------------------------ definition

def define(library: torch.library.Library) -> None:
    """Defines the trd_fast::fused_linear_* ops in `library` (a "trd_fast" fragment the caller keeps alive):
    schemas, implementations, fakes and autograd. Called once, by registry.register()."""
    for name, implementation, fake in (("fused_linear_loss", fused_linear_loss, _fake_loss),
                                       ("fused_linear_values", fused_linear_values, _fake_values),
                                       ("fused_linear_values_backward", fused_linear_values_backward,
                                        _fake_values_backward)):
        library.define(name + SCHEMAS[name])
        library.impl(name, implementation, "CompositeExplicitAutograd")
        torch.library.register_fake(f"trd_fast::{name}", fake, lib=library)
    torch.library.register_autograd("trd_fast::fused_linear_loss", _loss_backward, setup_context=_loss_setup,
                                    lib=library)
    torch.library.register_autograd("trd_fast::fused_linear_values", _values_backward,
                                    setup_context=_values_setup, lib=library)
