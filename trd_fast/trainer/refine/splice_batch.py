"""trd_splice (this engine's fast mode): the teacher scores y_o once, a prefix scan of a per-token signal finds
the failure point k, and the teacher continues from k on its prefix KV cache (refine/splice.py); the targets are
its scoring logits up to k and its generation logits after, the prefix and suffix weighted apart."""

from __future__ import annotations

import time

import torch
from torch import Tensor

import trd_fast
from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes, student_rollout
from trd_fast.trainer.refine.splice import SignalFn, splice
from trd_fast.trainer.refine.stats import refinement_stats, splice_stats
from trd_fast.trainer.rollout.generation import Rollout
from trd_fast.trainer.train.batch import Batch


def splice_batch(request: BatchRequest) -> tuple[Batch, PhaseTimes]:
    """The trd_splice batch of the request's examples and the time of each phase."""
    d = request.config.distill
    student = student_rollout(request, capture_logits=d.splice_signal == "divergence")
    start = time.perf_counter()
    result = splice(request.teacher, request.teacher_contexts(), student.rollout,
                    splice_signal(d.splice_signal, student.rollout), threshold=d.splice_threshold,
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


def splice_signal(kind: str, rollout: Rollout) -> SignalFn:
    """The per-token failure signal on y_o from the teacher's scoring logits of positions [start, stop):
    "nll" -log q(y), "log_ratio" log p(y) - log q(y), "divergence" the per-token reverse KL(p || q)."""

    def signal(start: int, stop: int, teacher_logits: Tensor) -> Tensor:          # [B, c, V] -> [B, c]
        tokens = rollout.tokens[:, start:stop]
        teacher_logp = trd_fast.token_logprobs(teacher_logits, tokens)
        if kind == "nll":
            return -teacher_logp
        if kind == "log_ratio":
            return rollout.logprobs[:, start:stop] - teacher_logp
        _, per_token = trd_fast.distillation_loss(rollout.logits[:, start:stop], teacher_logits,
                                                  divergence="reverse_kl", reduction="none",
                                                  return_per_token=True)
        return per_token

    return signal
