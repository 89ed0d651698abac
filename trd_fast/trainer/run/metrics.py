"""metrics.jsonl (one record per step, truncated to the checkpoint's step on resume), the curves PNG, and one
step's record from every rank's share of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trd_fast.text_files import read_utf8
from trd_fast.trainer.refine.stats import splice_position_over
from trd_fast.trainer.rollout.counters import TokenCounters

METRICS = "metrics.jsonl"
CURVES = "curves.png"
# How the ranks' records of one step combine (every other key is a mean over rows: the mean of the ranks' means,
# their shares being equal). Loss terms, trained tokens, grad_norm and lr are already global on every rank.
GLOBAL = ("step", "loss", "divergence", "entropy", "epistemic_mass", "trained_tokens", "grad_norm", "lr")
SLOWEST = ("step_s", "rollout_s", "refine_s", "train_s")      # wall-clock: the slowest rank's
SUMMED = ("student_prefill_tokens", "student_decode_tokens", "teacher_prefill_tokens", "teacher_decode_tokens",
          "teacher_draft_tokens", "teacher_accepted_tokens", "teacher_tokens", "teacher_forwards",
          "teacher_rescore_forwards", "teacher_rescore_tokens", "teacher_scored_tokens")
PLOTTED = ("loss", "divergence", "entropy", "y_o_accuracy", "y_r_accuracy", "failure_rate", "y_o_len", "y_r_len",
           "epistemic_mass", "eval_accuracy", "step_s", "teacher_tokens")


class MetricsLog:
    def __init__(self, directory: Path, resume_step: int):
        self.path = directory / METRICS
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def merge_records(records: list[dict]) -> dict:
    """One step's record of the whole run from each rank's record of its share (one record: itself)."""
    if len(records) == 1:
        return records[0]
    merged = {}
    for key, first in records[0].items():
        values = [r[key] for r in records]
        if key in GLOBAL:
            merged[key] = first
        elif key in SLOWEST:
            merged[key] = max(values)
        elif key in SUMMED:
            merged[key] = sum(values)
        elif isinstance(first, bool):
            merged[key] = any(values)
        elif key == "splice_position":  # a mean over each rank's failed rows
            merged[key] = splice_position_over([r["failure_rate"] for r in records], values)
        else:
            merged[key] = sum(values) / len(values)
    if "trained_tokens_per_s" in merged:
        merged["trained_tokens_per_s"] = merged["trained_tokens"] / merged["step_s"]
    if "teacher_acceptance" in merged:
        merged["teacher_acceptance"] = TokenCounters(draft_tokens=merged["teacher_draft_tokens"],
                                                     accepted_tokens=merged["teacher_accepted_tokens"]).acceptance
    return merged


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in read_utf8(path).splitlines() if line.strip()]


def plot_curves(records: list[dict], path: Path, title: str) -> Path | None:
    """One panel per logged quantity against step; None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [k for k in PLOTTED if any(r.get(k) is not None for r in records)]
    if not series:
        return None
    columns = 3
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, series):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
