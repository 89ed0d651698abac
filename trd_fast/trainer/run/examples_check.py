"""The run's examples, checked before the first step: the task forms every prompt the run will need, and each
sequence a model is fed (a prompt once tokenized, plus the tokens generated after it) fits in its context."""

from __future__ import annotations

from typing import Sequence

from trd_fast.trainer.protocol import Example, Task
from trd_fast.trainer.run.config import TrainConfig


def context_length(model) -> int | None:
    """The positions the model was built for (config.max_position_embeddings or n_positions); None if unknown."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_examples(config: TrainConfig, task: Task, tokenizer, examples: Sequence[Example], *, split: str,
                   with_teacher: bool, student_context: int | None, teacher_context: int | None,
                   rows: Sequence[int] | None = None) -> None:
    """Check examples[i] for each i in `rows` (default: all): the task forms its prompts, the student prompt
    tokenizes to at least one token, and x + rollout.max_new_tokens fits the student's context. `with_teacher`
    (training) also checks the teacher's sequence: its scoring or continuation context + max_new_tokens (opd,
    trd_splice), or the refine prompt + an attempt and a rewrite of max_new_tokens each (trd). A context of
    None is not checked. Raises ValueError naming the example (its file and line when it has one)."""
    rows = range(len(examples)) if rows is None else rows
    budget = config.rollout.max_new_tokens
    privileged = config.distill.teacher_source == "self"
    rewrites = config.distill.mode == "trd"
    student_texts, teacher_texts = [], []
    for i in rows:
        try:
            student_texts.append(task.student_prompt(examples[i]))
            if with_teacher:
                teacher_texts.append(task.refine_prompt(examples[i], "", privileged) if rewrites
                                     else task.teacher_prompt(examples[i], privileged))
        except (ValueError, KeyError, IndexError) as error:
            raise ValueError(f"{_where(examples, i, split)}: cannot form its prompts ({error})") from None
    student_lengths = _token_counts(tokenizer, student_texts)
    for i, length in zip(rows, student_lengths):
        if length == 0:
            raise ValueError(f"{_where(examples, i, split)}: the student prompt is empty once tokenized")
    checks = [(student_lengths, student_context, "student prompt", "the student", budget, "rollout.max_new_tokens")]
    if with_teacher and rewrites:
        checks.append((_token_counts(tokenizer, teacher_texts), teacher_context, "refine prompt", "the teacher",
                       2 * budget, "an attempt and a rewrite of rollout.max_new_tokens each"))
    elif with_teacher:
        checks.append((_token_counts(tokenizer, teacher_texts), teacher_context, "teacher prompt", "the teacher",
                       budget, "rollout.max_new_tokens"))
    for lengths, context, what, model, generated, generated_as in checks:
        check_fit(examples, lengths, rows=rows, split=split, context=context, what=what, model=model,
                  generated=generated, generated_as=generated_as)


def check_fit(examples: Sequence[Example], lengths: Sequence[int], *, rows: Sequence[int] | None = None, split: str,
              context: int | None, what: str, model: str, generated: int, generated_as: str) -> None:
    """ValueError naming the first examples[rows[j]] whose `what` (lengths[j] tokens) plus `generated` tokens
    exceeds `model`'s `context` (nothing is checked when it is None)."""
    if context is None:
        return
    for i, length in zip(range(len(examples)) if rows is None else rows, lengths):
        if length + generated > context:
            raise ValueError(f"{_where(examples, i, split)}: the {what} is {length} tokens; with {generated} more "
                             f"({generated_as}) it exceeds {model}'s context of {context} positions "
                             f"(max_position_embeddings)")


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []


def _where(examples: Sequence[Example], index: int, split: str) -> str:
    example = examples[index]
    return example.origin or f"{split} example {index} ({example.prompt[:40]!r})"
