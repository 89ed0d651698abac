"""Clip, weight and reduce per-position divergences: O(N) torch ops after the fused O(N V) kernel."""

from __future__ import annotations

import torch


def reduce_values(values: torch.Tensor, *, clip: float | None, weight: torch.Tensor | None, normalizer,
                  reduction: str) -> torch.Tensor:
    """values [...] fp32 -> loss. Order: clip (zero gradient above it), then weight, then the reduction.

    A zero weight gives exactly 0 (even for an inf or NaN value); a zero normalizer gives loss 0 and zero
    gradient. Everything stays on the device: no host synchronisation.
    """
    if clip is not None:
        values = torch.where(values > clip, torch.full_like(values, clip), values)
    if weight is not None:
        w = weight.detach().to(torch.float32)
        values = torch.where(w == 0, torch.zeros_like(values), w * values)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    # Built on the device (a fill, never a host-to-device copy of a Python number).
    if normalizer is None:
        normalizer = w.sum() if weight is not None else _device_scalar(values.numel(), values)
    elif isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().to(device=values.device, dtype=torch.float32)
    else:
        normalizer = _device_scalar(normalizer, values)
    zero = normalizer == 0
    safe = torch.where(zero, torch.ones_like(normalizer), normalizer)
    return torch.where(zero, torch.zeros_like(total), total / safe)


def _device_scalar(value, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=torch.float32, device=like.device)
