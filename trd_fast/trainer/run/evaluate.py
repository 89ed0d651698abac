"""Greedy evaluation of a model on held-out examples: every completion, the verifier's verdict on each, the
accuracy and the mean completion length. The run's evaluations, `trd-fast eval`, the demo and pretraining all
use it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from trd_fast.trainer.protocol import Example, Task, Tokenize
from trd_fast.trainer.rollout.generation import Runner, SamplingConfig
from trd_fast.trainer.run.examples_check import check_fit, context_length
from trd_fast.trainer.run.loading import load_causal_lm, load_tokenizer

EVAL_SEED = 0  # the held-out problems do not change with the run's seed


@dataclass(frozen=True)
class Evaluation:
    completions: list[str]         # each example's greedy completion, decoded without special tokens
    lengths: list[int]             # its length in tokens (eos included when produced)
    verdicts: list[bool | None]    # the verifier's verdict on it (None: the example has no answer)

    @property
    def verified(self) -> tuple[int, int]:
        """(verified completions, examples with an answer): the counts the accuracy is, summable over shards."""
        checked = [v for v in self.verdicts if v is not None]
        return sum(checked), len(checked)

    @property
    def accuracy(self) -> float:
        """The share of verified completions among the examples with an answer; nan when none has one."""
        return accuracy(*self.verified)

    @property
    def mean_len(self) -> float:
        return sum(self.lengths) / max(1, len(self.lengths))

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "mean_len": self.mean_len, "problems": len(self.completions)}


def accuracy(correct: float, checked: float) -> float:
    """`correct` verified completions of `checked` examples with an answer, as a share; nan when `checked` is 0."""
    return correct / checked if checked else math.nan


def evaluate(runner: Runner, task: Task, tokenize: Tokenize, examples: Sequence[Example], *, max_new_tokens: int,
             prompt_of: Callable[[Example], str] | None = None, batch_size: int = 64,
             progress: bool = False) -> Evaluation:
    """Greedy completions of `prompt_of(example)` (default: the student prompt) in batches of `batch_size`,
    at most `max_new_tokens` tokens each, judged by the task's verifier. ValueError naming the example when a
    prompt and max_new_tokens exceed the model's context (checked before any generation)."""
    prompt_of = prompt_of or task.student_prompt
    prompts = [tokenize(prompt_of(e)) for e in examples]
    check_fit(examples, [len(p) for p in prompts], split="eval", context=context_length(runner.model), what="prompt",
              model="the model", generated=max_new_tokens, generated_as="max_new_tokens")
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    completions, lengths, verdicts = [], [], []
    bar = tqdm(total=len(examples), desc="eval", disable=not progress, leave=False)
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        rollout = runner.generate(prompts[lo:lo + batch_size], greedy,
                                  generator=torch.Generator().manual_seed(0), capture=False)
        for e, y in zip(chunk, rollout.rows()):
            text = tokenize.text(y)
            completions.append(text)
            lengths.append(len(y))
            verdicts.append(task.verify(e, text))
        bar.update(len(chunk))
    bar.close()
    return Evaluation(completions, lengths, verdicts)


def evaluate_saved(directory: str | Path, task: Task, examples: Sequence[Example], *, device: str = "cpu",
                   **options) -> Evaluation:
    """`evaluate` of the model saved in `directory` (a Hugging Face model directory with its tokenizer);
    `options` as evaluate's. The tokenizer and the path are checked before the weights load."""
    tokenizer = load_tokenizer(directory, role="student")
    model = load_causal_lm(directory, role="student", device=device)
    return evaluate(Runner.with_tokenizer(model, tokenizer, name="student"), task, Tokenize(tokenizer), examples,
                    **options)
