"""Viewing [..., V] inputs as the kernels' [B, L, V] rows without copying where strides allow."""

from __future__ import annotations

import math

import torch


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, L, V] with stride(-1) == 1: a view unless the leading layout cannot be two strides.

    The kernels read row r = b * L + l at b * stride(0) + l * stride(1), so any leading layout whose dims fall
    into at most two runs of mergeable dims (like `logits[:, :-1]`, or a slice of a 4-D tensor) is a view; a
    layout needing three or more strides is copied. Each input of a pair takes its own split.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    width = x.shape[-1]
    runs = _leading_runs(x)
    if len(runs) > 2:
        return x.reshape(1, -1, width)
    batch, length = ([1] + runs)[-2:] if runs else (1, 1)
    return x.view(batch, length, width)


def _leading_runs(x: torch.Tensor) -> list[int]:
    """The sizes of the leading dims of x merged into runs that a single stride walks (size-1 dims dropped)."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    if math.prod(x.shape[:-1]) == 0:
        return [0]
    runs: list[list[int]] = []  # [size, innermost stride] of each run
    for size, stride in dims:
        if runs and runs[-1][1] == size * stride:  # the outer run steps over exactly this dim
            runs[-1] = [runs[-1][0] * size, stride]
        else:
            runs.append([size, stride])
    return [size for size, _ in runs]


def rows_like(lead: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-position tensor `lead` [...] laid out as [B, L] to match `rows` [B, L, V]."""
    return lead.reshape(rows.shape[:2])
