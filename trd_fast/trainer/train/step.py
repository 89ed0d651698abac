"""The training step's loss: the student's packed backbone forward over (x, y), the fused linear distillation
loss of its hidden states and LM head against the teacher targets (the teacher's hidden states and LM head, or
its top-k log-probs), backward in micro-batches with the normalizer fixed to the global batch's token count (so
gradient accumulation gives the same gradient as one big batch). No [n, V] logits exist in a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import trd_fast
from trd_fast.heads import LMHead, lm_head
from trd_fast.ops.fused_linear_tiles import release_tile_buffers
from trd_fast.trainer.rollout.capture import concat_targets
from trd_fast.trainer.run.config import DistillConfig
from trd_fast.trainer.train.batch import Batch
from trd_fast.trainer.train.forward import packed_hidden
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


# Values of the hidden width a decoder layer keeps per token for its backward (norms, q/k/v, attention output,
# residuals, the MLP's gate/up/activation at about 3x the width): an estimate, for splitting a step by bytes.
ACTIVATION_VALUES_PER_LAYER = 24


def activation_bytes(model) -> int:
    """Estimated bytes of activations the training forward keeps per token (ACTIVATION_VALUES_PER_LAYER)."""
    config = model.config.get_text_config()
    size = next(model.parameters()).element_size()
    return max(1, config.hidden_size * config.num_hidden_layers * ACTIVATION_VALUES_PER_LAYER * size)


def pieces(lengths: list[int], micro_batches: int, tokens: int, at_least: int = 0) -> list[tuple[int, int]]:
    """Row ranges [lo, hi): the rows split into `micro_batches` equal pieces, each cut further so that its rows
    hold at most `tokens` tokens (lengths: tokens per row; a row longer than that is a piece alone), then the
    piece of most rows halved until there are `at_least` pieces (ValueError when the rows are too few)."""
    rows = len(lengths)
    bounds = [round(i * rows / micro_batches) for i in range(micro_batches + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        start, held = lo, 0
        for row in range(lo, hi):
            if row > start and held + lengths[row] > tokens:
                out.append((start, row))
                start, held = row, 0
            held += lengths[row]
        if hi > start:
            out.append((start, hi))
    return halved(out, at_least)


def halved(ranges: list[tuple[int, int]], at_least: int) -> list[tuple[int, int]]:
    """Row ranges with the range of most rows halved until there are `at_least` (ValueError when too few rows)."""
    out = list(ranges)
    while len(out) < at_least:
        i = max(range(len(out)), key=lambda j: out[j][1] - out[j][0]) if out else None
        if i is None or out[i][1] - out[i][0] < 2:
            raise ValueError(f"{sum(hi - lo for lo, hi in out)} rows cannot make {at_least} pieces")
        lo, hi = out[i]
        out[i:i + 1] = [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
    return out


@dataclass
class StepResult:
    loss: float              # the global batch's loss
    divergence: float        # mean raw per-token divergence over trained tokens
    entropy: float           # mean student entropy (T = 1) over trained tokens, on the loss's support
    epistemic_mass: float    # mean teacher probability on the epistemic tokens over trained tokens, same support
    tokens: int              # trained tokens in the global batch (the normaliser)
    sparse_targets: bool     # the teacher targets were kept as top-k


def train_on(model, batch: Batch, d: DistillConfig, *, micro_batches: int, epistemic_ids: Tensor,
             teacher_head: LMHead, budget_bytes: int, total_tokens: int | None = None,
             agree: Callable[[int], int] = int) -> StepResult:
    """Forward and backward over the batch (gradients accumulate in the model); no optimizer step. The loss and
    the per-token means are normalised by `total_tokens`, the trained tokens of the global batch (default: this
    batch's); when the batch is one rank's share, its values are that rank's share of the global ones.

    The student's LM head is read from `model` after each forward (its weight a parameter: it trains; under a
    wrapper that swaps parameters, the one the forward used); teacher_head: the head of the teacher whose hidden
    states batch.targets holds (unused for top-k targets). The metrics form
    logits in row blocks of at most `budget_bytes`, and each of the `micro_batches` pieces is split further so
    that its estimated activations (activation_bytes) fit `budget_bytes` (one row at least): gradient
    accumulation with the normalizer fixed makes the split change nothing but the peak memory. agree: the number
    of pieces every rank runs from this rank's (the most over ranks: a sharded model's forward and backward are
    collectives, so every rank runs as many; this rank then halves its pieces to match)."""
    spec = loss_spec(d)
    device = next(model.parameters()).device
    total = sum(len(y) for y in batch.completions) if total_tokens is None else total_tokens
    normalizer = torch.tensor(float(max(total, 1)), device=device)
    lengths = [len(x) + len(y) for x, y in zip(batch.contexts, batch.completions)]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, divergence, entropy, epistemic mass
    sparse = False
    own = pieces(lengths, micro_batches, budget_bytes // activation_bytes(model))
    for lo, hi in halved(own, agree(len(own))):
        sequences = [torch.cat([x.to(device), y.to(device)])
                     for x, y in zip(batch.contexts[lo:hi], batch.completions[lo:hi])]
        keep = [torch.arange(len(x) - 1, len(x) + len(y) - 1)
                for x, y in zip(batch.contexts[lo:hi], batch.completions[lo:hi])]
        weight = torch.cat(batch.weights[lo:hi]).to(device)                    # [n]
        hidden = packed_hidden(model, sequences, keep)                         # [n, H_s]
        student_head = lm_head(model, "student")
        teacher = concat_targets(batch.targets[lo:hi])                         # [n, H_t] or top-k [n, k]
        is_sparse = isinstance(teacher, trd_fast.SparseTeacher)
        sparse = sparse or is_sparse
        top_k = None if is_sparse else spec.top_k
        entropy, mass = support_stats(hidden, student_head, teacher, teacher_head, top_k=top_k,
                                      epistemic_ids=epistemic_ids, budget_bytes=budget_bytes)
        teacher_arguments = {} if is_sparse else teacher_head.loss_arguments("teacher")
        loss, per_token = trd_fast.fused_linear_distillation_loss(
            hidden, teacher_hidden=teacher, **student_head.loss_arguments("student"), **teacher_arguments,
            divergence=spec.divergence, beta=spec.beta, temperature=d.temperature, top_k=top_k, clip=spec.clip,
            weight=weight, normalizer=normalizer, return_per_token=True)
        loss.backward()
        sums += torch.stack([v.detach().double() for v in (loss, per_token.sum(), entropy.sum(), mass.sum())])
    count = max(total, 1)
    loss_sum, divergence_sum, entropy_sum, mass_sum = sums.tolist()  # the step's one host sync
    release_tile_buffers()  # the loss keeps its CPU tiles between its calls: not into the next step's rollouts
    return StepResult(loss=loss_sum, divergence=divergence_sum / count, entropy=entropy_sum / count,
                      epistemic_mass=mass_sum / count, tokens=total, sparse_targets=sparse)
