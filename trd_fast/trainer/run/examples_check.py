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


def check_examples(config: TrainConfig, task: Task, tokenizer, train: Sequence[Example],
                   evaluation: Sequence[Example], *, student_context: int | None,
                   teacher_context: int | None) -> None:
    """Raise ValueError, naming the example (its file and line when it has one) and the prompt, for the first
    example whose prompts the task cannot form, whose student prompt tokenizes to nothing, or whose sequences
    exceed a model's context: x + rollout.max_new_tokens for the student; for the teacher, its scoring or
    continuation context + max_new_tokens (opd, trd_splice), or the refine prompt + an attempt of
    max_new_tokens + the rewrite of max_new_tokens (trd). `evaluation` examples only need the student's."""
    budget = config.rollout.max_new_tokens
    privileged = config.distill.teacher_source == "self"
    rewrites = config.distill.mode == "trd"
    for split, examples in (("train", train), ("eval", evaluation)):
        student_texts, teacher_texts = [], []
        for i, example in enumerate(examples):
            try:
                student_texts.append(task.student_prompt(example))
                if split == "train":
                    teacher_texts.append(task.refine_prompt(example, "", privileged) if rewrites
                                         else task.teacher_prompt(example, privileged))
            except (ValueError, KeyError, IndexError) as error:
                raise ValueError(f"{_where(example, split, i)}: cannot form its prompts ({error})") from None
        student_lengths = _token_counts(tokenizer, student_texts)
        for i, length in enumerate(student_lengths):
            if length == 0:
                raise ValueError(f"{_where(examples[i], split, i)}: the student prompt is empty once tokenized")
        _check_fits(examples, split, student_lengths, student_context, "student prompt", "the student",
                    budget, "rollout.max_new_tokens")
        if rewrites:
            _check_fits(examples, split, _token_counts(tokenizer, teacher_texts), teacher_context, "refine prompt",
                        "the teacher", 2 * budget, "an attempt and a rewrite of rollout.max_new_tokens each")
        else:
            _check_fits(examples, split, _token_counts(tokenizer, teacher_texts), teacher_context, "teacher prompt",
                        "the teacher", budget, "rollout.max_new_tokens")


def _check_fits(examples: Sequence[Example], split: str, lengths: list[int], context: int | None, what: str,
                model: str, generated: int, generated_as: str) -> None:
    if context is None:
        return
    for i, length in enumerate(lengths):
        if length + generated > context:
            raise ValueError(f"{_where(examples[i], split, i)}: the {what} is {length} tokens; with {generated} "
                             f"more ({generated_as}) it exceeds {model}'s context of {context} positions "
                             f"(max_position_embeddings)")


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []


def _where(example: Example, split: str, index: int) -> str:
    return example.origin or f"{split} example {index} ({example.prompt[:40]!r})"
