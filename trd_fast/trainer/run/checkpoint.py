"""Atomic training checkpoints: the student (or its LoRA adapters), the optimizer, the schedule, every RNG
and the data position, written to a temporary file and renamed over the previous checkpoint."""

from __future__ import annotations

import os
import random
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


def non_finite_tensors(weights: dict[str, torch.Tensor], optimizer_state: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf: weights by name, optimizer state as
    "optimizer[i].key" (i: the parameter's index in the optimizer)."""
    named = list(weights.items())
    named += [(f"optimizer[{i}].{key}", t) for i, entry in optimizer_state.items() for key, t in entry.items()
              if isinstance(t, torch.Tensor)]
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


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
    bad = non_finite_tensors(state["model"], state["optimizer"]["state"])
    if bad:
        kept = f"{path} still holds the previous checkpoint" if path.is_file() else "no checkpoint was written"
        raise NonFiniteState(f"step {step}: {len(bad)} tensor(s) of the weights or optimizer state hold NaN or "
                             f"inf (first: {bad[0]}); {kept} and the run stops here")
    temporary = directory / f".{CHECKPOINT}.tmp-{os.getpid()}"
    torch.save(state, temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)
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
    bad = non_finite_tensors(state["model"], state["optimizer"]["state"])
    if bad:
        raise NonFiniteState(f"checkpoint {path} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); it "
                             f"cannot be resumed: remove it, or set run.resume=false")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return int(state["step"])
