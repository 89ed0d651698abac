"""The one cosine schedule: pretraining's rates are, bit for bit, those that produced the shipped weights, and
the trainer's scheduler gives the rates it always gave."""

from __future__ import annotations

import math

import pytest
import torch

from trd_fast.drivers import pretrain
from trd_fast.trainer.run.schedule import cosine_schedule


def shipped_pretrain_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """The formula the shipped teacher and student were pretrained with (written out here as it ran)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def trainer_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The factor the trainer's scheduler applied to the configured rate (written out here as it ran)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_pretraining_rates_are_the_shipped_ones_bit_for_bit(name):
    total, peak = pretrain.DEFAULT_STEPS[name], pretrain.DEFAULT_LR[name]
    for steps, lr in ((total, peak), (4, peak), (150, 0.05)):
        for step in range(steps + 3):
            assert pretrain.learning_rate(step, steps, lr) == shipped_pretrain_rate(step, steps, lr), (steps, step)


@pytest.mark.parametrize("warmup, total, min_ratio", [(1, 4, 0.1), (10, 100, 0.0), (3, 2, 0.25)])
def test_trainer_scheduler_rates_are_unchanged(warmup, total, min_ratio):
    lr = 3e-4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = cosine_schedule(optimizer, warmup, total, min_ratio)
    for step in range(total + 2):
        assert scheduler.get_last_lr()[0] == lr * trainer_factor(step, warmup, total, min_ratio), step
        optimizer.step()
        scheduler.step()
