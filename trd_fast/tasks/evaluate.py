"""Quick greedy evaluation of a model on the chain task (pretraining reports and tests)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from trd_fast.trainer.protocol import Example

from trd_fast.tasks.generator import STEP_TOKENS


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40,
                    batch_size: int = 128) -> list[str]:
    """Greedy completions (special tokens removed) of left-padded prompt batches."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                        padding_side="left")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def first_mistake_step(completion: str, reference: str) -> int | None:
    """Index of the step holding the first token that differs from the reference; None if identical."""
    got, ref = completion.split(), reference.split()
    for t, (g, r) in enumerate(zip(got, ref)):
        if g != r:
            return t // STEP_TOKENS
    return None if len(got) == len(ref) else min(len(got), len(ref)) // STEP_TOKENS


def accuracy(task, examples: Sequence[Example], completions: Sequence[str]) -> tuple[float, Counter]:
    """Fraction verified, and a histogram of the step of the first mistake among failures."""
    ok, hist = 0, Counter()
    for ex, c in zip(examples, completions):
        if task.verify(ex, c):
            ok += 1
        else:
            hist[first_mistake_step(c, ex.solution)] += 1
    return ok / max(len(examples), 1), hist


def evaluate(model, tokenizer, task, examples: Sequence[Example],
             prompt_of: Callable[[Example], str] | None = None, **kw) -> tuple[float, Counter]:
    prompt_of = prompt_of or task.student_prompt
    return accuracy(task, examples, greedy_complete(model, tokenizer, [prompt_of(e) for e in examples], **kw))
