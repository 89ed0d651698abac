"""Where the shipped checkpoints live."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
MODEL_NAMES = ("teacher", "student")


def checkpoint_dir(name: str = "teacher") -> Path:
    """The directory of a shipped model ("teacher" or "student"): HF weights, config and tokenizer."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")
    return CHECKPOINTS / name
