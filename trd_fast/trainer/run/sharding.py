"""FSDP2 (torch.distributed.fsdp.fully_shard) for the models of a multi-process run: the student sharded per
decoder layer and at the root, the teacher sharded the same way or replicated, and generation on unsharded
weights (one all-gather per model per rollout phase, none per token)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class its `_no_split_modules` names (transformers marks its
    decoder layers so). ValueError when the model names none that it has."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot shard {type(model).__name__}: it marks no decoder layer class in _no_split_modules")
    return layers


def shard(model: nn.Module, *, trains: bool) -> nn.Module:
    """`model` under FSDP2: fully_shard on every decoder layer, then on the root. On CUDA parameters are gathered
    in bf16 and gradients reduced in fp32; on the CPU everything stays in the parameters' dtype. Gradients are
    summed over ranks (not averaged): the loss is already normalised by the global batch's token count."""
    device = next(model.parameters()).device
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if trains:
        for module in fsdp_modules(model):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every FSDP-managed module of `model`, the root last; [] for a model that is not sharded."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)][::-1]


@contextmanager
def unsharded(*models: nn.Module) -> Iterator[None]:
    """Within the block every sharded model holds its full parameters: each is all-gathered once on entry (a
    collective: every rank enters together) and no forward inside gathers or frees anything, so ranks may run
    different numbers of forwards (rows stop at different lengths). On exit the parameters are sharded again and
    FSDP's defaults restored (layers free their parameters after forward, the root keeps them until backward).
    Models that are not sharded pass through untouched."""
    roots = [m for m in models if isinstance(m, FSDPModule)]
    for root in roots:
        root.set_reshard_after_forward(False)
        for module in fsdp_modules(root):
            module.unshard()
    try:
        yield
    finally:
        for root in roots:
            for module in fsdp_modules(root):
                module.reshard()
            root.set_reshard_after_forward(True)
            root.set_reshard_after_forward(False, recurse=False)


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_value(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return value.to_local() if isinstance(value, DTensor) else value
