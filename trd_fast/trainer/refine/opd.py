"""opd (on-policy distillation, no refinement): the student trains on its own rollout (x, y_o); the targets are
one teacher scoring forward over (teacher context, y_o), kept as the teacher's final hidden states (or top-k)."""

from __future__ import annotations

import time

import torch

from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes, student_rollout
from trd_fast.trainer.refine.stats import refinement_stats
from trd_fast.trainer.train.batch import Batch


def opd_batch(request: BatchRequest) -> tuple[Batch, PhaseTimes]:
    """The opd batch of the request's examples (every y_o token weighted 1) and the time of each phase."""
    student = student_rollout(request, capture=False)
    y_o = student.y_o
    start = time.perf_counter()
    scored = request.teacher.score(request.teacher_contexts(), y_o, row_ids=request.row_ids)    # [B, M, H]
    targets = [request.teacher.targets(scored[b, :len(y)]) for b, y in enumerate(y_o)]
    weights = [torch.ones(len(y)) for y in y_o]
    times = PhaseTimes(rollout=student.seconds, refine=time.perf_counter() - start)
    stats = refinement_stats(request.task, request.tokenize, request.examples, y_o, None)
    return Batch(student.contexts, y_o, targets, weights, y_o, None, stats), times
