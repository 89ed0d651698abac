"""trd (the paper's refinement): the teacher rewrites each rollout y_o into y_r from a refine prompt holding it;
the student trains on (x, y_r) against the teacher's forwards that generated y_r (their final hidden states, or
top-k; no re-scoring).
With distill.draft_tokens the teacher verifies y_o as a draft of y_r (rollout/draft.py): the same y_r, in fewer
forwards."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes, student_rollout
from trd_fast.trainer.refine.stats import refinement_stats
from trd_fast.trainer.rollout.draft import Drafter
from trd_fast.trainer.train.batch import Batch


def rewrite_batch(request: BatchRequest) -> tuple[Batch, PhaseTimes]:
    """The trd batch of the request's examples (every y_r token weighted 1) and the time of each phase."""
    student = student_rollout(request, capture=False)
    y_o = student.y_o
    start = time.perf_counter()
    refine_contexts = refine_prompts(request, y_o)
    draft = request.teacher_draft()
    rewrite = request.teacher.generate(refine_contexts, request.teacher_sampling(), generator=request.generator,
                                       capture=True, progress=request.progress("rewrite"),
                                       row_ids=request.row_ids,
                                       drafter=Drafter(draft, y_o, request.teacher.eos_id, contexts=refine_contexts)
                                       if draft else None)
    y_r = rewrite.rows()
    targets = rewrite.targets
    weights = [torch.ones(len(y)) for y in y_r]
    times = PhaseTimes(rollout=student.seconds, refine=time.perf_counter() - start)
    stats = refinement_stats(request.task, request.tokenize, request.examples, y_o, y_r)
    return Batch(student.contexts, y_r, targets, weights, y_o, None, stats), times


def refine_prompts(request: BatchRequest, y_o: list[Tensor]) -> list[Tensor]:
    """The teacher's context per row for rewriting its rollout y_o: the task's refine prompt holding it, 1-D int64."""
    tokenize = request.tokenize
    return [tokenize(request.task.refine_prompt(e, tokenize.text(y), request.privileged))
            for e, y in zip(request.examples, y_o)]
