"""Plain-torch oracles for every op: the test oracle and the "torch" backend.

Everything here materialises [..., V] intermediates and is written for clarity, not speed. Inputs in
float64 are computed in float64; every other float dtype in float32. Zero-probability terms are guarded
with `where(x == 0, 0, ...)` (NaN != 0, so NaN inputs still give NaN), and the divergence has a
hand-written backward so that -inf logits never put NaN into a gradient.
"""

from __future__ import annotations

import math

import torch

from trd_fast.constants import IGNORE_INDEX


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    # log M = log((1 - beta) p + beta q), in log space
    return torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))


def _xlog_ratio(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    # x (log x - log y) with 0 log 0 = 0; NaN stays NaN
    return torch.where(x == 0, torch.zeros_like(x), x * (log_x - log_y))


class _Divergence(torch.autograd.Function):
    """Per-position divergence l over the last dim of already common-width logits.

    forward_kl = sum q (log q - log p)          dl/da = p - q
    reverse_kl = sum p (log p - log q)          dl/da = p (log p - log q - l)
    jsd (0 < beta < 1), M = (1 - beta) p + beta q:
        l = beta KL(q || M) + (1 - beta) KL(p || M)
        dl/da = (1 - beta) p (log p - log M - KL(p || M))
    with a = s / T, so dl/ds = dl/da / T. Positions with an infinite l, or an upstream gradient of 0, get a
    zero gradient row.
    """

    @staticmethod
    def forward(ctx, student, teacher, divergence, beta, temperature):
        dtype = compute_dtype(student, teacher)
        log_p = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
        log_q = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
        p, q = log_p.exp(), log_q.exp()
        if divergence == "forward_kl":
            value = _xlog_ratio(q, log_q, log_p).sum(-1)
            direction = p - q
        elif divergence == "reverse_kl":
            value = _xlog_ratio(p, log_p, log_q).sum(-1)
            direction = _xlog_ratio(p, log_p, log_q + value.unsqueeze(-1))
        else:
            log_m = _log_mixture(log_p, log_q, beta)
            kl_p = _xlog_ratio(p, log_p, log_m).sum(-1)
            value = beta * _xlog_ratio(q, log_q, log_m).sum(-1) + (1 - beta) * kl_p
            direction = (1 - beta) * _xlog_ratio(p, log_p, log_m + kl_p.unsqueeze(-1))
        ctx.save_for_backward(direction, value)
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value):
        direction, value = ctx.saved_tensors
        scale = grad_value.to(direction.dtype) / ctx.temperature
        live = (scale != 0) & ~torch.isinf(value)
        grad = torch.where(live.unsqueeze(-1), direction * scale.unsqueeze(-1), torch.zeros_like(direction))
        return grad.to(ctx.student_dtype), None, None, None, None


def effective_divergence(divergence: str, beta: float) -> str:
    """The divergence to compute: jsd at beta 0 is exactly forward_kl and at beta 1 reverse_kl (the contract's
    limits of the generalized JSD, TRL's convention); anything else unchanged."""
    if divergence == "jsd" and beta == 0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1:
        return "reverse_kl"
    return divergence


def _gather_support(student: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor):
    """Student and teacher restricted to `ids` ([..., k], -1 = empty slot, which becomes -inf on both)."""
    empty = ids < 0
    safe_ids = ids.clamp(min=0)
    minus_inf = torch.tensor(float("-inf"), dtype=student.dtype, device=student.device)
    student_sub = torch.where(empty, minus_inf, student.gather(-1, safe_ids))
    teacher_sub = torch.where(empty, minus_inf.to(teacher_logits.dtype), teacher_logits)
    return student_sub, teacher_sub


def per_position_divergence(student_logits, teacher, *, divergence="forward_kl", beta=0.5, temperature=1.0, top_k=None):
    """The raw per-position divergence l [...] (differentiable w.r.t. student_logits).

    `teacher` is dense logits [..., V_t] or a SparseTeacher. float64 in, float64 out; else float32.
    """
    divergence = effective_divergence(divergence, beta)
    student_sub, teacher_sub, _ = divergence_support(student_logits, teacher, top_k=top_k)
    return _Divergence.apply(student_sub, teacher_sub.detach(), divergence, beta, temperature)


def divergence_support(student_logits, teacher, *, top_k=None):
    """The columns the divergence is taken over: (student [..., w], teacher [..., w], ids [..., w] or None).

    Dense teacher logits: the common columns [0, min(V_s, V_t)) (ids None: column j is token j), or with
    `top_k` the teacher's top-k among them (ids: their token ids). SparseTeacher: its ids, an empty slot (-1)
    -inf on both sides. Differentiable w.r.t. student_logits.
    """
    if hasattr(teacher, "ids"):  # SparseTeacher: its own support
        student_sub, teacher_sub = _gather_support(student_logits, teacher.logprobs, teacher.ids)
        return student_sub, teacher_sub, teacher.ids
    width = min(student_logits.shape[-1], teacher.shape[-1])
    student_c, teacher_c = student_logits[..., :width], teacher[..., :width]
    if top_k is None:
        return student_c, teacher_c, None
    ids = teacher_c.topk(min(top_k, width), dim=-1).indices
    return student_c.gather(-1, ids), teacher_c.gather(-1, ids), ids


def reduce(values, *, clip=None, weight=None, normalizer=None, reduction="mean"):
    """Clip, weight and reduce per-position values l [...] as the contract orders them."""
    if clip is not None:
        values = torch.where(values > clip, torch.full_like(values, clip), values)
    if weight is not None:
        w = weight.detach().to(values.dtype)
        values = torch.where(w == 0, torch.zeros_like(values), w * values)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = weight.detach().to(values.dtype).sum() if weight is not None else values.numel()
    normalizer = torch.as_tensor(normalizer, dtype=values.dtype, device=values.device)
    zero = normalizer == 0
    return torch.where(zero, torch.zeros_like(total), total / torch.where(zero, torch.ones_like(normalizer), normalizer))


def distillation_loss(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                      top_k=None, clip=None, weight=None, normalizer=None, reduction="mean",
                      return_per_token=False):
    """The whole contract of trd_fast.distillation_loss in plain torch (no argument checks)."""
    values = per_position_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta,
                                     temperature=temperature, top_k=top_k)
    loss = reduce(values, clip=clip, weight=weight, normalizer=normalizer, reduction=reduction)
    return (loss, values.detach()) if return_per_token else loss


def project_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """An LM head's logits z = c tanh(a (h W^T + b) / c) (c = softcap; z = a (h W^T + b) without one).

    hidden [..., H], weight [V, H], bias [V] -> [..., V], differentiable, in float64 when any input is
    float64, else float32 (the projection accumulated in that dtype whatever the inputs' dtypes).
    """
    dtype = compute_dtype(hidden, weight, *([] if bias is None else [bias]))
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = logit_scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def token_logprobs(logits, token_ids, temperature=1.0):
    """log softmax(logits / T) at token_ids [...]; ids == -100 give 0 and no gradient."""
    dtype = compute_dtype(logits)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    ignored = token_ids == IGNORE_INDEX
    picked = log_probs.gather(-1, token_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def prefix_scan(signal, lengths, *, threshold, window=1):
    """Inclusive cumsum within each row's length, and the first position whose trailing mean > threshold.

    signal [B, L], lengths [B] -> cumsum [B, L] (signal's dtype), first [B] int64.
    """
    batch, length = signal.shape
    if length == 0:
        return signal.clone(), lengths.to(torch.int64)
    dtype = compute_dtype(signal)
    positions = torch.arange(length, device=signal.device)
    inside = positions.unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    x = torch.where(inside, signal.to(dtype), torch.zeros((), dtype=dtype, device=signal.device))
    cumsum = x.cumsum(-1)
    # the trailing window summed directly (not as a difference of cumsums: a NaN or inf stays in its windows)
    window_sum = torch.nn.functional.pad(x, (window - 1, 0)).unfold(-1, window, 1).sum(-1)
    count = torch.clamp(positions + 1, max=window).to(dtype)
    trailing_mean = window_sum / count
    hit = inside & (trailing_mean > threshold)
    first = torch.where(hit.any(-1), hit.to(torch.int8).argmax(-1), lengths.to(torch.int64))
    cumsum = torch.where(inside, cumsum, torch.zeros_like(cumsum))
    return cumsum.to(signal.dtype), first.to(torch.int64)
