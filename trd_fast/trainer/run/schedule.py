"""The learning-rate schedule of every training run here (the trainer's and pretraining's): linear warmup, then a
cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, *, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The rate of 0-based optimizer step `step` of `total`: peak * (step + 1) / warmup during the `warmup` steps,
    then peak * (r + (1 - r) (1 + cos(pi t)) / 2) with r = min_ratio and t the share of the remaining steps done
    (capped at 1, so steps past `total` keep the floor peak * r)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """cosine_lr as a scheduler of `optimizer`, whose configured rate is the peak."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, peak=1.0, warmup=warmup, total=total, min_ratio=min_ratio))
