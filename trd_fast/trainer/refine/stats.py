"""The refinement statistics of a batch (the paper's diagnostics): lengths and verifier accuracy of the
student's rollouts y_o and of their refinements y_r, how often refinement turned a failure into a pass and back,
and for trd_splice where and how often the failure point was found."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from trd_fast.trainer.protocol import Example, Task, Tokenize
from trd_fast.trainer.refine.splice import Splice

# The statistics of every refining mode (trd, trd_splice), by name.
REFINEMENT = ("y_o_accuracy", "y_r_accuracy", "y_o_len", "y_r_len", "fail_to_pass", "pass_to_fail")


def refinement_stats(task: Task, tokenize: Tokenize, examples: Sequence[Example], y_o: list[Tensor],
                     y_r: list[Tensor] | None) -> dict[str, float]:
    """Mean lengths of y_o (and y_r), and when the task can verify: the accuracy of y_o (and of y_r, with the
    shares of rows refinement made pass from failing, and fail from passing). y_r is None for opd."""
    stats = {"y_o_len": mean([len(y) for y in y_o])}
    original = [task.verify(e, tokenize.text(y)) for e, y in zip(examples, y_o)]
    if y_r is not None:
        stats["y_r_len"] = mean([len(y) for y in y_r])
    if any(v is None for v in original):
        return stats
    stats["y_o_accuracy"] = mean(original)
    if y_r is not None:
        rewritten = [task.verify(e, tokenize.text(y)) for e, y in zip(examples, y_r)]
        stats["y_r_accuracy"] = mean(rewritten)
        stats["fail_to_pass"] = mean([not a and b for a, b in zip(original, rewritten)])
        stats["pass_to_fail"] = mean([a and not b for a, b in zip(original, rewritten)])
    return stats


def splice_stats(result: Splice) -> dict[str, float]:
    """The share of rows with a failure point, its mean position among them (nan when none failed), and the
    y_o positions the teacher scored before the prefix scan stopped it."""
    failed = result.failed
    return {"failure_rate": failed.float().mean().item(),
            "splice_position": result.cut[failed].float().mean().item() if failed.any() else math.nan,
            "teacher_scored_tokens": float(result.scored.sum().item())}


def combine_stats(parts: list[dict[str, float]], rows: list[int]) -> dict[str, float]:
    """The statistics of all rows from those of row groups (rows[i]: group i's rows): teacher_scored_tokens
    added up, splice_position averaged over the groups' failed rows, every other statistic over their rows; a
    statistic some group lacks (accuracies, where a row cannot be verified) is left out, as for one group."""
    out = {}
    for key in [k for k in parts[0] if all(k in p for p in parts)]:
        values = [p[key] for p in parts]
        if key == "teacher_scored_tokens":
            out[key] = sum(values)
        elif key == "splice_position":
            out[key] = splice_position_over([p["failure_rate"] * n for p, n in zip(parts, rows)], values)
        else:
            out[key] = sum(v * n for v, n in zip(values, rows)) / sum(rows) if sum(rows) else math.nan
    return out


def splice_position_over(failed: list[float], positions: list[float]) -> float:
    """The mean failure point of groups with failed[i] failed rows (weights) at mean positions[i]; nan when none
    failed."""
    total = sum(failed)
    return sum(f * p for f, p in zip(failed, positions) if f) / total if total else math.nan


def mean(values) -> float:
    """The mean of numbers or booleans; nan for none."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan
