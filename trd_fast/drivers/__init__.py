"""Drivers above the trainer: the shipped demo (opd vs trd vs trd_splice) and pretraining of the shipped models."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (for counts of processes or runs)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
