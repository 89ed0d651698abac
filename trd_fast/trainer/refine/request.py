"""What each mode's batch builder is given (a BatchRequest), what every mode starts from (the student's rollout
y_o of the step's prompts) and what every builder returns beside its batch (the time of each phase)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from trd_fast.trainer.protocol import Example, Task, Tokenize
from trd_fast.trainer.rollout.draft import DraftConfig
from trd_fast.trainer.rollout.generation import Rollout, Runner, SamplingConfig
from trd_fast.trainer.run.config import TrainConfig


@dataclass(frozen=True)
class BatchRequest:
    config: TrainConfig            # the run's configuration (its rollout, distill and run sections are read)
    task: Task                     # prompts, refine prompts and the verifier
    tokenize: Tokenize             # text <-> ids with the student's tokenizer (its ids agree with the teacher's)
    student: Runner                # every student forward of the rollout goes through it
    teacher: Runner                # every teacher forward (scoring, rewriting, continuing) goes through it
    generator: torch.Generator     # every sampling draw of the step
    examples: Sequence[Example]    # the step's problems, one batch row each
    row_ids: list[int]             # their dataset indices: the ledger's row ids (re-scoring is noticed per row)

    @property
    def privileged(self) -> bool:
        """The teacher is the frozen student given the reference solution (self-distillation)."""
        return self.config.distill.teacher_source == "self"

    def progress(self, label: str) -> str | None:
        """The description of a progress bar, or None when the run shows none."""
        return label if self.config.run.progress else None

    def teacher_contexts(self) -> list[Tensor]:
        """The teacher's context per row for scoring or continuing y_o, 1-D int64 each."""
        return [self.tokenize(self.task.teacher_prompt(e, self.privileged)) for e in self.examples]

    def teacher_sampling(self) -> SamplingConfig:
        """How the teacher draws the tokens it writes (a rewrite, or a continuation after the cut)."""
        r = self.config.rollout
        return SamplingConfig(temperature=r.teacher_temperature, max_new_tokens=r.max_new_tokens)

    def teacher_draft(self) -> DraftConfig | None:
        """How the teacher verifies y_o as a draft of what it writes; None: plain decoding."""
        d = self.config.distill
        return DraftConfig(tokens=d.draft_tokens, match=d.draft_match) if d.draft_tokens else None


@dataclass(frozen=True)
class PhaseTimes:
    rollout: float    # seconds of the student's rollout
    refine: float     # seconds of the teacher's work: scoring, rewriting or splicing, with its targets


@dataclass(frozen=True)
class StudentRollout:
    contexts: list[Tensor]   # the student's context x per row, 1-D int64
    rollout: Rollout         # its samples y_o (with their final hidden states when captured)
    y_o: list[Tensor]        # y_o per row, 1-D int64 of its length
    seconds: float           # the rollout's wall time


def student_rollout(request: BatchRequest, *, capture: bool) -> StudentRollout:
    """The student samples y_o after each example's student prompt (`capture`: keep its final hidden states)."""
    r = request.config.rollout
    contexts = [request.tokenize(request.task.student_prompt(e)) for e in request.examples]
    sampling = SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens)
    start = time.perf_counter()
    rollout = request.student.generate(contexts, sampling, generator=request.generator,
                                       capture=capture, progress=request.progress("rollout"),
                                       row_ids=request.row_ids)
    return StudentRollout(contexts, rollout, rollout.rows(), time.perf_counter() - start)
