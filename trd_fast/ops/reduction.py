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
    normalizer = mean_normalizer(weight, normalizer, values.numel(), values)
    zero = normalizer == 0
    safe = torch.where(zero, torch.ones_like(normalizer), normalizer)
    return torch.where(zero, torch.zeros_like(total), total / safe)


def mean_normalizer(weight: torch.Tensor | None, normalizer, count: int, like: torch.Tensor) -> torch.Tensor:
    """The 0-d fp32 denominator of "mean" on like's device: `normalizer`, or sum(weight), or `count`."""
    # Built on the device (a fill, never a host-to-device copy of a Python number).
    if normalizer is None:
        return weight.detach().to(torch.float32).sum() if weight is not None else _device_scalar(count, like)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(device=like.device, dtype=torch.float32)
    return _device_scalar(normalizer, like)


def reduction_gradient(values: torch.Tensor, *, clip: float | None, weight: torch.Tensor | None,
                       scale: torch.Tensor) -> torch.Tensor:
    """d reduce_values / d values [...] fp32 for "sum" (scale 1) or "mean" (scale 1 / normalizer, 0 for a zero
    normalizer): the weight (1 without one), 0 where it is 0 and where the value is clipped (values > clip)."""
    grad = scale.to(torch.float32).expand(values.shape)
    if weight is not None:
        w = weight.detach().to(torch.float32)
        grad = torch.where(w == 0, torch.zeros_like(w), w * grad)
    if clip is not None:
        grad = torch.where(values > clip, torch.zeros_like(grad), grad)
    return grad


def mean_scale(normalizer: torch.Tensor) -> torch.Tensor:
    """1 / normalizer, or 0 for a zero normalizer (then the loss and its gradient are 0)."""
    zero = normalizer == 0
    return torch.where(zero, torch.zeros_like(normalizer), 1 / torch.where(zero, torch.ones_like(normalizer), normalizer))


def _device_scalar(value, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=torch.float32, device=like.device)
