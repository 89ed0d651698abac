"""Checkpoints of a multi-process run with torch.distributed.checkpoint: every rank writes its shards of the student
and of the optimizer state, with the schedule, the data position and its own RNG states, into
`checkpoints/step-N.tmp/`, where rank 0 first records the config that trained them (config.yaml); when every rank
has finished, rank 0 renames it to `checkpoints/step-N/` and removes the older ones. A write interrupted at any
point leaves the previous `step-*` directory whole, and only complete ones are ever resumed."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trd_fast.trainer.run.checkpoint import NonFiniteState, non_finite_values
from trd_fast.trainer.run.config import CONFIG, config_yaml
from trd_fast.trainer.run.sharding import local_value
from trd_fast.trainer.run.world import World

CHECKPOINTS = "checkpoints"
STEP_DIRECTORY = re.compile(r"step-(\d+)")


def save_sharded(directory: Path, *, step: int, config: dict, model, optimizer, scheduler, generator: torch.Generator,
                 world: World) -> Path:
    """Write the run's state after `step` optimizer steps, with `config` (TrainConfig.to_dict()) that trained it
    (every rank calls it); returns the checkpoint directory.
    NonFiniteState on every rank, nothing renamed, when any rank's shards hold NaN or inf."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    bad = non_finite_values({"model": _local(model_state), "optimizer": _local(optimizer_state)})
    if world.sum([float(len(bad))])[0]:
        where = f" (first on rank {world.rank}: {bad[0]})" if bad else ""
        raise NonFiniteState(f"step {step}: the weights or optimizer state to save hold NaN or inf{where}; the run "
                             f"stops here and the previous checkpoint stays the last one")
    root = directory / CHECKPOINTS
    final, temporary = root / f"step-{step}", root / f"step-{step}.tmp"
    if world.main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        _write_synced(temporary / CONFIG, config_yaml(config))
    world.barrier()
    state = {"step": step,  # optimizer steps done; the data position is step * batch_size
             "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             f"rng_rank{world.rank}": _rng_state(generator)}
    dcp.save(state, checkpoint_id=temporary)  # returns on every rank once all have written and the metadata is in
    # Rank 0 alone renames and prunes while the others wait in the barrier: one rename and the unlinking of the older
    # checkpoint's files (one per rank and the metadata), a few file-system operations whatever the model's size,
    # so the wait stays far below run.collective_timeout_s. The writing itself is spread over the ranks.
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for older in _complete(root):
            if older != final:
                shutil.rmtree(older)
    world.barrier()
    return final


def load_sharded(directory: Path, *, model, optimizer, scheduler, generator: torch.Generator,
                 world: World) -> int | None:
    """Restore the newest complete checkpoint that `save_sharded` wrote (every rank calls it, with the world size
    that wrote it); returns its step, or None when there is none."""
    complete = _complete(directory / CHECKPOINTS)
    if not complete:
        return None
    path = complete[-1]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    rng_key = f"rng_rank{world.rank}"
    state = {"step": 0, "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             rng_key: _rng_state(generator)}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be resumed by this run of {world.size} process(es) ({error}); "
                         f"resume with the world size and models that wrote it, or set run.resume=false") from None
    bad = non_finite_values({"model": _local(state["model"]), "optimizer": _local(state["optimizer"])})
    if world.sum([float(len(bad))])[0]:
        raise NonFiniteState(f"checkpoint {path} holds NaN or inf; it cannot be resumed: remove it, or set "
                             f"run.resume=false")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state[rng_key]
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return int(state["step"])


def has_sharded(directory: Path) -> bool:
    """`directory` holds a complete checkpoint save_sharded wrote."""
    return bool(_complete(directory / CHECKPOINTS))


def sharded_config(directory: Path) -> tuple[dict | None, Path]:
    """The config (TrainConfig.to_dict()) that trained the newest complete checkpoint under `directory`, and where it
    is recorded; None when there is none, or it is from a version that did not record one."""
    complete = _complete(directory / CHECKPOINTS)
    path = complete[-1] / CONFIG if complete else directory / CHECKPOINTS
    if not path.is_file():
        return None, path
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"{path} cannot be read ({reason}); remove the checkpoint, or set run.resume=false") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a config mapping; remove the checkpoint, or set run.resume=false")
    return config, path


def _write_synced(path: Path, text: str) -> None:
    """`text` into `path`, flushed to disk (it joins a checkpoint whose shards dcp flushes too)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def discard_sharded(directory: Path) -> None:
    """Removes the checkpoints save_sharded wrote under `directory` (finished and unfinished `step-N` directories,
    then `checkpoints/` itself if nothing else is in it); anything else there is left alone."""
    root = directory / CHECKPOINTS
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir() and STEP_DIRECTORY.fullmatch(entry.name.removesuffix(".tmp")):
            shutil.rmtree(entry)
    if not any(root.iterdir()):
        root.rmdir()


def _complete(root: Path) -> list[Path]:
    """The finished checkpoint directories under `root`, oldest first (a `.tmp` one is an unfinished write)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIRECTORY.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def _local(state):
    """`state` with every DTensor replaced by this rank's shard (so checks need no collective per tensor)."""
    if isinstance(state, dict):
        return {k: _local(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_local(v) for v in state)
    return local_value(state) if isinstance(state, torch.Tensor) else state
