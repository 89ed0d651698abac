"""The student's differentiable training forward: logits at chosen positions of many rows in one call."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def packed_logits(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    """One differentiable forward over all rows (1-D int64 tokens each, no padding): [sum len(keep[i]), V]
    logits at positions keep[i] of row i (strictly increasing), rows in order.

    With flash attention the rows are packed into one [1, T] sequence whose position ids restart at 0 per row
    (varlen attention: no pad token costs anything). Other attention implementations see packed rows through a
    dense [T, T] mask, quadratic in the whole batch, so they get a right-padded [B, L] batch instead, whose head
    computes the logits at every position any row keeps ([B, U, V], U the union of keep) before the gather."""
    if len(rows) != len(keep) or not rows:
        raise ValueError(f"rows and keep must be non-empty and of one length, got {len(rows)} and {len(keep)}")
    for i, (row, k) in enumerate(zip(rows, keep)):
        if row.ndim != 1 or len(row) == 0 or row.dtype != torch.int64:
            raise ValueError(f"rows[{i}] must be a non-empty 1-D int64 tensor, got {tuple(row.shape)} {row.dtype}")
        if k.ndim != 1 or k.dtype != torch.int64:
            raise ValueError(f"keep[{i}] must be a 1-D int64 tensor, got {tuple(k.shape)} {k.dtype}")
    bad = torch.stack([((k < 0) | (k >= len(r))).any() | (k.diff() <= 0).any() for r, k in zip(rows, keep)])
    if bad.any():
        raise ValueError(f"keep[{int(bad.int().argmax())}] must hold strictly increasing positions inside its row")
    if model.config._attn_implementation.startswith("flash_attention"):
        return _packed(model, rows, keep)
    return _padded(model, rows, keep)


def _packed(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device = model.device
    starts = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0).tolist()
    ids = torch.cat(list(rows)).to(device)[None]                                          # [1, T]
    positions = torch.cat([torch.arange(len(r)) for r in rows]).to(device)[None]         # [1, T]
    index = torch.cat([k.to(device) + s for k, s in zip(keep, starts)])                  # [N]
    return model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=index).logits[0]


def _padded(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device, width = model.device, max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                 # [B, L]
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                # [B, L]
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    positions = torch.cat(list(keep)).to(device)                                          # [N]
    union = positions.unique()                                                            # [U] sorted
    batch_rows = torch.repeat_interleave(torch.tensor([len(k) for k in keep], device=device))  # [N]
    # A 1-D index tensor keeps the same positions of every row in every transformers version (a 2-D one does not).
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=union).logits  # [B, U, V]
    return logits[batch_rows, torch.searchsorted(union, positions)]                       # [N, V]
