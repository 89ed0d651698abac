"""TRL's generalized JSD distillation loss (`GKDTrainer.generalized_jsd_loss`) on trd_fast's fused kernel.

Per position, with p = softmax(student / T) and q = softmax(teacher / T) (TRL's convention, and ours):
  beta == 0 -> KL(q || p);  beta == 1 -> KL(p || q);
  otherwise  -> beta KL(q || M) + (1 - beta) KL(p || M),  M = (1 - beta) p + beta q,
which is `distillation_loss(divergence="jsd", beta=beta, temperature=T)`. Positions whose label is -100 are
left out. The reduction, over the M kept positions and the V vocabulary columns:
  num_items_in_batch given -> sum / num_items_in_batch, whatever `reduction` says (as TRL does)
  "batchmean"              -> sum / max(M, 1) with labels; sum / max(size(0), 1) without (TRL's first dim)
  "sum"                    -> sum
  "mean"                   -> sum / (M * V): TRL averages its [M, V] per-vocabulary terms (0 / 0 = NaN)
  "none"                   -> the per-vocabulary terms [M, V] ([..., V] without labels): a fused kernel
                              never forms them, so this one case runs in plain torch
Every other case runs on the fused op: no [N, V] intermediate besides the student gradient.

Where this differs from TRL, on purpose: the result is computed in fp32 (TRL computes in the logits' dtype;
it is returned in TRL's dtype, promote(student, teacher)); the teacher never receives a gradient; unequal
vocabularies use the common columns [0, min(V_s, V_t)) (TRL raises); an unknown `reduction`, a beta outside
[0, 1] or a temperature <= 0 raise ValueError (TRL returns per-vocabulary terms or NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trd_fast.constants import IGNORE_INDEX
from trd_fast.ops import distillation_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """Drop-in for TRL's `GKDTrainer.generalized_jsd_loss` (same signature, same values and gradients).

    student_logits [..., V] (gradient flows here), teacher_logits [..., V], labels [...] (-100 = ignored).
    """
    return jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)


def jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
             num_items_in_batch=None, *, backend=None, inplace_backward=False):
    """generalized_jsd_loss with trd_fast's own options (backend, inplace_backward; see distillation_loss)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    mask = _mask(labels, student_logits)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)  # the dtype TRL returns
    if reduction == "none" and num_items_in_batch is None:
        terms = per_vocabulary_jsd(student_logits, teacher_logits, beta, temperature)
        return terms if mask is None else terms[mask]
    total = distillation_loss(student_logits, teacher_logits, divergence="jsd", beta=beta, temperature=temperature,
                              weight=mask, reduction="sum", backend=backend, inplace_backward=inplace_backward)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif reduction == "sum":
        loss = total
    elif reduction == "batchmean":
        loss = total / (mask.sum().clamp_min(1) if mask is not None else max(student_logits.shape[0], 1))
    else:  # "mean": over positions x vocabulary columns
        positions = mask.sum() if mask is not None else student_logits[..., 0].numel()
        loss = total / (positions * min(student_logits.shape[-1], teacher_logits.shape[-1]))
    return loss.to(dtype)


def per_vocabulary_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's [..., V] per-vocabulary terms (their sum over V is the per-position divergence), in plain torch."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature!r}")
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    log_p = F.log_softmax(student_logits[..., :width] / temperature, dim=-1).to(dtype)  # [..., V]
    log_q = F.log_softmax(teacher_logits.detach()[..., :width] / temperature, dim=-1).to(dtype)  # [..., V]
    if beta == 0:
        return _kl_terms(log_q, log_p)
    if beta == 1:
        return _kl_terms(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))  # log M, [..., V]
    return beta * _kl_terms(log_q, log_m) + (1 - beta) * _kl_terms(log_p, log_m)


def _kl_terms(log_a, log_b):
    """a (log a - log b) per element, 0 where a == 0 (F.kl_div's convention, with log-space inputs)."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True)


def _mask(labels, student_logits):
    """labels != -100 as a bool [...] mask, or None without labels."""
    if labels is None:
        return None
    lead = tuple(student_logits.shape[:-1])
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a tensor of shape {lead} (the logits' leading shape), got {shape}")
    return labels.to(student_logits.device) != IGNORE_INDEX
