"""Viewing [..., V] inputs as the kernels' [B, L, V] rows without copying where strides allow."""

from __future__ import annotations

import torch


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, L, V] with stride(-1) == 1; a view unless the leading strides cannot be expressed.

    Two leading dims with arbitrary strides cover sliced logits such as `logits[:, :-1]` ([B, T-1, V] out of
    a contiguous [B, T, V]); anything else is flattened, copying only if the view is impossible.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    width = x.shape[-1]
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 1:
        return x.view(1, 1, width)
    try:
        return x.view(1, -1, width)
    except RuntimeError:
        pass
    try:
        return x.view(-1, x.shape[-2], width)
    except RuntimeError:
        return x.reshape(1, -1, width)


def rows_like(lead: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-position tensor `lead` [...] laid out as [B, L] to match `rows` [B, L, V]."""
    return lead.reshape(rows.shape[:2])
