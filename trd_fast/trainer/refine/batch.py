"""One step's training data per mode: the student's rollout y_o, the teacher's refinement y_r (rewrite or
splice) and the teacher targets for every trained token, captured while the teacher worked (no re-scoring).

  opd         student trains on (x, y_o); targets: one teacher scoring forward over (teacher context, y_o)
  trd         the teacher rewrites y_o from a refine prompt; targets: its logits while generating y_r
  trd_splice  the teacher scores y_o once, a prefix scan finds the failure point k, the teacher continues from
              k with the prefix KV cache; targets: scoring logits up to k, generation logits after
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

import trd_fast

from trd_fast.trainer.run.config import TrainConfig
from trd_fast.trainer.rollout.draft import DraftConfig, Drafter
from trd_fast.trainer.rollout.generation import Rollout, Runner, SamplingConfig
from trd_fast.trainer.refine.splice import splice
from trd_fast.trainer.protocol import Example, Task


@dataclass
class Batch:
    contexts: list[Tensor]        # the student's context x per row, 1-D int64
    completions: list[Tensor]     # the trained completion per row (y_o or y_r), 1-D int64
    targets: list[Tensor]         # per row [len(completion), V_t] fp32 teacher logits predicting each token
    weights: list[Tensor]         # per row [len(completion)] fp32 loss weights
    originals: list[Tensor]       # the student's rollout y_o per row
    cut: Tensor | None            # trd_splice: [B] failure point k per row (len(y_o) where none); else None
    stats: dict[str, float] = field(default_factory=dict)  # refinement metrics of this batch


class Tokenize:
    """Text -> 1-D int64 ids, and completion ids -> text, with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)

    def text(self, ids: Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def rows_of(rollout: Rollout) -> list[Tensor]:
    return [rollout.tokens[b, :n] for b, n in enumerate(rollout.lengths.tolist())]


def build_batch(config: TrainConfig, task: Task, tokenize: Tokenize, examples: Sequence[Example],
                student: Runner, teacher: Runner, generator: torch.Generator, row_ids: list[int],
                phase_times: dict[str, float], clock: Callable[[], float]) -> Batch:
    d, r = config.distill, config.rollout
    privileged = d.teacher_source == "self"
    contexts = [tokenize(task.student_prompt(e)) for e in examples]
    sampling = SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens)
    teacher_sampling = SamplingConfig(temperature=r.teacher_temperature, max_new_tokens=r.max_new_tokens)
    draft = DraftConfig(tokens=d.draft_tokens, match=d.draft_match)
    progress = "rollout" if config.run.progress else None

    start = clock()
    need_student_logits = d.mode == "trd_splice" and d.splice_signal == "divergence"
    rollout = student.generate(contexts, sampling, generator=generator, capture_logits=need_student_logits,
                               progress=progress, row_ids=row_ids)
    y_o = rows_of(rollout)
    phase_times["rollout"] = clock() - start

    start = clock()
    stats: dict[str, float] = {}
    cut = None
    if d.mode == "opd":
        teacher_contexts = [tokenize(task.teacher_prompt(e, privileged)) for e in examples]
        scored = teacher.score(teacher_contexts, y_o, row_ids=row_ids)              # [B, M, V]
        completions, targets = y_o, [scored[b, :len(y)] for b, y in enumerate(y_o)]
        weights = [torch.ones(len(y)) for y in y_o]
    elif d.mode == "trd":
        refine_contexts = [tokenize(task.refine_prompt(e, tokenize.text(y), privileged))
                           for e, y in zip(examples, y_o)]
        rewrite = teacher.generate(refine_contexts, teacher_sampling, generator=generator, capture_logits=True,
                                   progress="rewrite" if progress else None, row_ids=row_ids,
                                   drafter=Drafter(draft, y_o, teacher.eos_id) if draft.tokens else None)
        completions = rows_of(rewrite)
        targets = [rewrite.logits[b, :len(y)] for b, y in enumerate(completions)]
        weights = [torch.ones(len(y)) for y in completions]
    else:
        teacher_contexts = [tokenize(task.teacher_prompt(e, privileged)) for e in examples]
        result = splice(teacher, teacher_contexts, rollout, _splice_signal(config, rollout),
                        threshold=d.splice_threshold, window=d.splice_window, chunk=d.splice_chunk or None,
                        sampling=teacher_sampling, generator=generator, row_ids=row_ids,
                        progress="splice" if progress else None, draft=draft)
        completions, targets = result.tokens, result.targets
        weights = []
        for y, k in zip(completions, result.cut.tolist()):
            w = torch.full((len(y),), d.prefix_weight)
            w[k:] = d.suffix_weight
            weights.append(w)
        cut, failed = result.cut, result.failed
        stats["failure_rate"] = failed.float().mean().item()
        stats["splice_position"] = result.cut[failed].float().mean().item() if failed.any() else float("nan")
        stats["teacher_scored_tokens"] = float(result.scored.sum().item())
    phase_times["refine"] = clock() - start

    stats.update(_refinement_stats(task, tokenize, examples, y_o, completions, d.mode != "opd"))
    return Batch(contexts, completions, targets, weights, y_o, cut, stats)


def _splice_signal(config: TrainConfig, rollout: Rollout):
    """The per-token failure signal on y_o from the teacher's scoring logits of positions [start, stop)."""
    kind = config.distill.splice_signal

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


def _refinement_stats(task: Task, tokenize: Tokenize, examples: Sequence[Example], y_o: list[Tensor],
                      y_r: list[Tensor], refined: bool) -> dict[str, float]:
    stats = {"y_o_len": _mean([len(y) for y in y_o])}
    original = [task.verify(e, tokenize.text(y)) for e, y in zip(examples, y_o)]
    if refined:
        stats["y_r_len"] = _mean([len(y) for y in y_r])
    if any(v is None for v in original):
        return stats
    stats["y_o_accuracy"] = _mean(original)
    if refined:
        rewritten = [task.verify(e, tokenize.text(y)) for e, y in zip(examples, y_r)]
        stats["y_r_accuracy"] = _mean(rewritten)
        stats["fail_to_pass"] = _mean([not a and b for a, b in zip(original, rewritten)])
        stats["pass_to_fail"] = _mean([a and not b for a, b in zip(original, rewritten)])
    return stats


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
