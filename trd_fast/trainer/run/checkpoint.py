"""Atomic training checkpoints: the student (or its LoRA adapters), the optimizer, the schedule, every RNG
and the data position, written to a temporary file and renamed over the previous checkpoint; and model
directories, written beside the previous one and swapped in whole."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or only the LoRA adapters)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_checkpoint(directory: Path, *, step: int, model, optimizer, scheduler, generator: torch.Generator) -> Path:
    state = {
        "step": step,  # optimizer steps done; the data position is step * batch_size
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    path = directory / CHECKPOINT
    atomic_save(state, path)
    return path


def load_checkpoint(directory: Path, *, model, optimizer, scheduler, generator: torch.Generator) -> int | None:
    """Restore everything `save_checkpoint` wrote; returns the step, or None when there is no checkpoint."""
    path = directory / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = set(trainable_state(model)) - set(state["model"])
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: {len(missing)} trainable tensors missing, "
                         f"e.g. {sorted(missing)[0]!r} (a different student or LoRA setting?)")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return int(state["step"])


def atomic_save(state: dict, path: Path) -> None:
    """torch.save `state` to `path` through a temporary file beside it, flushed to disk and renamed over `path`:
    `path` holds the previous state or the new one, never a partial write."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def save_model_directory(model, tokenizer, directory: Path) -> None:
    """`model` and `tokenizer` as a Hugging Face model directory: saved into a sibling, then swapped in for
    `directory` (the previous one is renamed away first and removed last)."""
    temporary, previous = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)
