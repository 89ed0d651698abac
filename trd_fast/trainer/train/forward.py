"""The student's differentiable training forward: final hidden states at chosen positions of many rows in one
call, through the backbone only (the loss applies the LM head, so no logits are formed)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from trd_fast.heads import final_hidden_states


def packed_hidden(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    """One differentiable forward over all rows (1-D int64 tokens each, no padding): [sum len(keep[i]), H] final
    hidden states (after the final norm, the model's dtype) at positions keep[i] of row i (strictly increasing),
    rows in order.

    The model runs through its own forward with no logit position kept (logits_to_keep: an empty index) and its
    hidden states returned, so a wrapper's or an adapter's hooks see the step. With flash attention the rows
    are packed into one [1, T] sequence whose position ids restart at 0 per row (varlen attention: no pad token
    costs anything). Other attention implementations see packed rows through a dense [T, T] mask, quadratic in
    the whole batch, so they get a right-padded [B, L] batch instead."""
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


def _hidden(model, **inputs) -> Tensor:
    """[B, T, H] final hidden states of the model's own forward, its head run on no position."""
    return final_hidden_states(model, {**inputs, "use_cache": False})


def _packed(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device = model.device
    starts = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0).tolist()
    ids = torch.cat(list(rows)).to(device)[None]                                          # [1, T]
    positions = torch.cat([torch.arange(len(r)) for r in rows]).to(device)[None]         # [1, T]
    index = torch.cat([k.to(device) + s for k, s in zip(keep, starts)])                  # [N]
    return _hidden(model, input_ids=ids, position_ids=positions)[0, index]               # [N, H]


def _padded(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device, width = model.device, max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                 # [B, L]
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                # [B, L]
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    positions = torch.cat(list(keep)).to(device)                                          # [N]
    batch_rows = torch.repeat_interleave(torch.tensor([len(k) for k in keep], device=device))  # [N]
    return _hidden(model, input_ids=ids, attention_mask=mask)[batch_rows, positions]     # [N, H]
