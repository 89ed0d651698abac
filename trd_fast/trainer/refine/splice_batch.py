"""trd_splice (this engine's fast mode): the teacher scores y_o once, a prefix scan of a per-token signal finds
the failure point k, and the teacher continues from k on its prefix KV cache (refine/splice.py); the targets are
kept from its scoring forwards up to k and from its generating forwards after, the prefix and suffix weighted
apart."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

import trd_fast
from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes, student_rollout
from trd_fast.trainer.refine.splice import SignalFn, splice
from trd_fast.trainer.refine.stats import refinement_stats, splice_stats
from trd_fast.trainer.rollout.capture import map_logits
from trd_fast.trainer.rollout.generation import Rollout, Runner
from trd_fast.trainer.train.batch import Batch


def splice_batch(request: BatchRequest) -> tuple[Batch, PhaseTimes]:
    """The trd_splice batch of the request's examples and the time of each phase."""
    d = request.config.distill
    student = student_rollout(request, capture=d.splice_signal == "divergence")
    start = time.perf_counter()
    signal = splice_signal(d.splice_signal, student.rollout, request.student, request.teacher,
                           request.config.budget_bytes)
    result = splice(request.teacher, request.teacher_contexts(), student.rollout, signal, threshold=d.splice_threshold,
                    window=d.splice_window, chunk=d.splice_chunk or None, sampling=request.teacher_sampling(),
                    generator=request.generator, row_ids=request.row_ids, progress=request.progress("splice"),
                    draft=request.teacher_draft())
    weights = []
    for y, k in zip(result.tokens, result.cut.tolist()):
        w = torch.full((len(y),), d.prefix_weight)
        w[k:] = d.suffix_weight
        weights.append(w)
    times = PhaseTimes(rollout=student.seconds, refine=time.perf_counter() - start)
    stats = {**splice_stats(result),
             **refinement_stats(request.task, request.tokenize, request.examples, student.y_o, result.tokens)}
    return Batch(student.contexts, result.tokens, result.targets, weights, student.y_o, result.cut, stats), times


def splice_signal(kind: str, rollout: Rollout, student: Runner, teacher: Runner, budget_bytes: int) -> SignalFn:
    """The per-token failure signal on y_o from the teacher's scoring hidden states of positions [start, stop):
    "nll" -log q(y), "log_ratio" log p(y) - log q(y), "divergence" the per-token reverse KL(p || q) (from the
    student's hidden states, which the rollout then keeps). Logits exist one row block at a time: blocks of at
    most `budget_bytes` for the log-probs, the fused linear loss's own tiles for the divergence."""

    def signal(start: int, stop: int, teacher_hidden: Tensor) -> Tensor:          # [B, c, H_t] -> [B, c]
        tokens = rollout.tokens[:, start:stop].to(teacher_hidden.device)
        if kind == "divergence":
            student_hidden = torch.stack([F.pad(h[start:stop], (0, 0, 0, stop - start - len(h[start:stop])))
                                          for h in rollout.targets])                # [B, c, H_s]
            _, per_token = trd_fast.fused_linear_distillation_loss(
                student_hidden, teacher_hidden=teacher_hidden, **student.head.loss_arguments("student"),
                **teacher.head.loss_arguments("teacher"), divergence="reverse_kl", reduction="none",
                return_per_token=True)
            return per_token
        flat = tokens.reshape(-1)
        teacher_logp = map_logits(teacher.head, teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                                  lambda logits, rows: trd_fast.token_logprobs(logits, flat[rows]),
                                  budget_bytes).view(tokens.shape)
        if kind == "nll":
            return -teacher_logp
        return rollout.logprobs[:, start:stop].to(teacher_logp.device) - teacher_logp

    return signal
