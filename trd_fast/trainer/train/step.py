"""The training step's loss: the student's packed forward over (x, y), the fused distillation loss against
the teacher targets, backward in micro-batches with the normalizer fixed to the global batch's token count
(so gradient accumulation gives the same gradient as one big batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import trd_fast
from trd_fast.trainer.run.config import DistillConfig
from trd_fast.trainer.train.batch import Batch
from trd_fast.trainer.train.forward import packed_logits
from trd_fast.trainer.train.targets import build_targets
from trd_fast.trainer.train.token_stats import support_stats


@dataclass(frozen=True)
class LossSpec:
    divergence: str          # forward_kl | reverse_kl | jsd
    beta: float              # jsd interpolation weight
    clip: float | None       # per-position cap, or None
    top_k: int | None        # teacher top-k support, or None


def loss_spec(d: DistillConfig) -> LossSpec:
    """opd trains with its configured baseline loss; trd and trd_splice with full-vocabulary forward KL."""
    if d.mode != "opd" or d.opd_loss == "forward_kl":
        return LossSpec("forward_kl", 0.5, None, None)
    return {"reverse_kl": LossSpec("reverse_kl", 0.5, None, None),
            "clipped_forward_kl": LossSpec("forward_kl", 0.5, d.clip, None),
            "top_k_reverse_kl": LossSpec("reverse_kl", 0.5, None, d.loss_top_k),
            "jsd": LossSpec("jsd", d.jsd_beta, None, None)}[d.opd_loss]


@dataclass
class StepResult:
    loss: float              # the global batch's loss
    divergence: float        # mean raw per-token divergence over trained tokens
    entropy: float           # mean student entropy (T = 1) over trained tokens, on the loss's support
    epistemic_mass: float    # mean teacher probability on the epistemic tokens over trained tokens, same support
    tokens: int              # trained tokens in the global batch (the normaliser)
    sparse_targets: bool     # the teacher targets were kept as top-k


def train_on(model, batch: Batch, d: DistillConfig, *, micro_batches: int, epistemic_ids: Tensor,
             inplace_backward: bool, total_tokens: int | None = None) -> StepResult:
    """Forward and backward over the batch (gradients accumulate in the model); no optimizer step. The loss and
    the per-token means are normalised by `total_tokens`, the trained tokens of the global batch (default: this
    batch's); when the batch is one rank's share, its values are that rank's share of the global ones."""
    spec = loss_spec(d)
    device = next(model.parameters()).device
    total = sum(len(y) for y in batch.completions) if total_tokens is None else total_tokens
    normalizer = torch.tensor(float(max(total, 1)), device=device)
    rows = len(batch.completions)
    bounds = [round(i * rows / micro_batches) for i in range(micro_batches + 1)]
    loss_sum = divergence_sum = entropy_sum = mass_sum = 0.0
    sparse = False
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == hi:
            continue
        sequences = [torch.cat([x.to(device), y.to(device)])
                     for x, y in zip(batch.contexts[lo:hi], batch.completions[lo:hi])]
        keep = [torch.arange(len(x) - 1, len(x) + len(y) - 1)
                for x, y in zip(batch.contexts[lo:hi], batch.completions[lo:hi])]
        weight = torch.cat(batch.weights[lo:hi]).to(device)                    # [n]
        logits = packed_logits(model, sequences, keep)                         # [n, V_s]
        targets = build_targets(batch.targets[lo:hi], budget_mb=d.dense_target_mb, top_k=d.teacher_top_k,
                                student_vocab=logits.shape[-1])
        sparse = sparse or targets.is_sparse
        teacher, top_k = targets.rows(slice(None)), None if targets.is_sparse else spec.top_k
        entropy, mass = support_stats(logits, teacher, top_k=top_k, epistemic_ids=epistemic_ids)
        entropy_sum += float(entropy.sum())
        mass_sum += float(mass.sum())
        loss, per_token = trd_fast.distillation_loss(
            logits, teacher, divergence=spec.divergence, beta=spec.beta, temperature=d.temperature, top_k=top_k,
            clip=spec.clip, weight=weight, normalizer=normalizer, return_per_token=True,
            inplace_backward=inplace_backward)
        loss.backward()
        loss_sum += float(loss.detach())
        divergence_sum += float(per_token.sum())
    count = max(total, 1)
    return StepResult(loss=loss_sum, divergence=divergence_sum / count, entropy=entropy_sum / count,
                      epistemic_mass=mass_sum / count, tokens=total, sparse_targets=sparse)
