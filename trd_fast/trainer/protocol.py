"""The task protocol the trainer speaks: prompts, refine prompts, a verifier. Tasks implement it; the trainer
imports none of them (tasks/registry.py picks one for a run). Tokenize turns the task's texts into the ids the
trainer feeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Example:
    prompt: str                  # the problem as the task states it (not yet templated)
    solution: str | None = None  # a reference solution: the privileged information of a self-teacher (OPSD)
    answer: str | None = None    # the final answer the verifier checks against
    origin: str = ""             # where it was read (e.g. "train.jsonl:6"), for error messages; "" if generated


class Task(Protocol):
    """What the trainer needs from a task. All returned strings are fed to the tokenizer as they are."""

    def student_prompt(self, example: Example) -> str:
        """The student's context x; its rollout y_o follows it directly."""

    def teacher_prompt(self, example: Example, privileged: bool) -> str:
        """The teacher's context for scoring y_o or continuing it (opd, trd_splice). With `privileged` the
        reference solution is in it (self-distillation)."""

    def refine_prompt(self, example: Example, attempt: str, privileged: bool) -> str:
        """The teacher's context for rewriting the student's attempt y_o into y_r (trd)."""

    def verify(self, example: Example, completion: str) -> bool | None:
        """Whether a completion (decoded, special tokens removed) reaches the right answer; None when the
        example has no answer to check."""

    def examples(self, split: str, count: int, seed: int) -> Sequence[Example]:
        """`count` examples of `split` ("train" or "eval"), the same for the same seed."""


class Tokenize:
    """Text -> 1-D int64 ids, and completion ids -> text, with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)

    def text(self, ids: Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
