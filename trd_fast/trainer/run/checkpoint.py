"""Atomic training checkpoints: the student (or its LoRA adapters), the optimizer, the schedule, every RNG,
the data position and the config that trained them, written to a temporary file and renamed over the previous
checkpoint; and model directories, written beside the previous one and swapped in whole."""

from __future__ import annotations

import math
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


class NonFiniteState(FloatingPointError):
    """The weights or the optimizer state hold NaN or inf: such a state is never written or resumed."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or only the LoRA adapters)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def non_finite_values(state, prefix: str = "") -> list[str]:
    """Where `state` (tensors, floats, and dicts, lists and tuples of them) holds NaN or inf: the key paths of the
    offending floating-point tensors and floats, e.g. "optimizer.state.3.exp_avg"."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, float):
        return [] if math.isfinite(state) else [prefix]
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [where for key, value in items
            for where in non_finite_values(value, f"{prefix}.{key}" if prefix else str(key))]


def save_checkpoint(directory: Path, *, step: int, config: dict, model, optimizer, scheduler,
                    generator: torch.Generator) -> Path:
    """Write the run's state after `step` optimizer steps, with `config` (TrainConfig.to_dict()) that trained it."""
    state = {
        "step": step,  # optimizer steps done; the data position is step * batch_size
        "config": config,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    path = directory / CHECKPOINT
    try:
        atomic_save(state, path)
    except NonFiniteState as error:
        raise NonFiniteState(f"step {step}: {error}; the run stops here") from None
    return path


def load_checkpoint(directory: Path, *, model, optimizer, scheduler, generator: torch.Generator) -> int | None:
    """Restore everything `save_checkpoint` wrote; returns the step, or None when there is no checkpoint."""
    if not has_checkpoint(directory):
        return None
    path = directory / CHECKPOINT
    state = _read(path)
    missing = set(trainable_state(model)) - set(state["model"])
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: {len(missing)} trainable tensors missing, "
                         f"e.g. {sorted(missing)[0]!r} (a different student or LoRA setting?)")
    bad = non_finite_values(state)
    if bad:
        raise NonFiniteState(f"checkpoint {path} holds NaN or inf in {len(bad)} value(s) (first: {bad[0]}); it "
                             f"cannot be resumed: remove it, or set run.resume=false")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return int(state["step"])


def has_checkpoint(directory: Path) -> bool:
    """`directory` holds a checkpoint save_checkpoint wrote."""
    return (directory / CHECKPOINT).is_file()


def checkpoint_config(directory: Path) -> tuple[dict | None, Path]:
    """The config (TrainConfig.to_dict()) that trained the checkpoint in `directory`, and where it is recorded; None
    when there is no checkpoint, or it is from a version that did not record one. Its tensors are mapped, not read."""
    path = directory / CHECKPOINT
    return (_read(path, mmap=True).get("config") if has_checkpoint(directory) else None), path


def discard_checkpoint(directory: Path) -> None:
    """Removes the checkpoint save_checkpoint wrote in `directory`, and temporary files of interrupted writes."""
    (directory / CHECKPOINT).unlink(missing_ok=True)
    for temporary in directory.glob(f".{CHECKPOINT}.tmp-*"):
        temporary.unlink()


def _read(path: Path, mmap: bool = False) -> dict:
    """The state save_checkpoint wrote to `path`; ValueError naming the file when it is not one."""
    advice = "remove it, or set run.resume=false"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ValueError(f"checkpoint {path} cannot be read (not a file torch.save wrote); {advice}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:  # a damaged archive, or one whose objects this environment cannot rebuild
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); {advice}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} is not a training checkpoint of this engine; {advice}")
    return state


def atomic_save(state: dict, path: Path) -> None:
    """torch.save `state` to `path` through a temporary file beside it, flushed to disk and renamed over `path`:
    `path` holds the previous state or the new one, never a partial write. A state holding NaN or inf is not
    written (NonFiniteState, `path` unchanged)."""
    _refuse_non_finite(state, path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def save_model_directory(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """`model` (with the weights `state_dict` when given: a sharded model's full state) and `tokenizer` as a Hugging
    Face model directory: saved into a sibling, then swapped in for `directory` (the previous one is renamed away
    first and removed last). Weights holding NaN or inf are not written (NonFiniteState, `directory` unchanged)."""
    _refuse_non_finite(model.state_dict() if state_dict is None else state_dict, directory)
    temporary, previous = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state_dict)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)


def _refuse_non_finite(state, path: Path) -> None:
    bad = non_finite_values(state)
    if bad:
        kept = f"{path} keeps its previous content" if path.exists() else f"{path} was not written"
        raise NonFiniteState(f"{len(bad)} value(s) to save hold NaN or inf (first: {bad[0]}); {kept}")
