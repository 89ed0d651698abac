"""A batch of token rows held in a KV cache, with a mask of the slots that hold real tokens. Rows can leave the
batch, and rows of several batches can be cut back to a prefix and realigned into one left-padded batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import transformers
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from trd_fast.dependencies import release

# The forward keyword that takes the KV cache: transformers 5.24 renamed past_key_values to cache (the old name
# warns from 5.24 and is due to go in 5.40). check_filled catches a model that ignores the cache it was passed.
CACHE_KEYWORD = "cache" if release(transformers.__version__) >= (5, 24, 0) else "past_key_values"


@dataclass(frozen=True)
class CachedBatch:
    cache: DynamicCache  # per layer keys and values [B, H, S, D], positions baked in by the rows' position ids
    mask: Tensor         # [B, S] bool: slots holding real tokens (the others are padding, anywhere in the row)

    @property
    def lengths(self) -> Tensor:
        """[B] int64 real tokens per row: the position id of each row's next token."""
        return self.mask.sum(-1)

    def select(self, rows: Tensor) -> CachedBatch:
        """A new batch of the given rows [R] (a copy, so this batch can be dropped)."""
        return CachedBatch(holding([(k[rows], v[rows]) for k, v in _layers(self.cache)]), self.mask[rows])

    def crop(self, slots: int) -> CachedBatch:
        """The batch cut to its first `slots` slots. The cache is cut in place (each layer keeps a view of its
        first slots; the next forward's append copies them as it would anyway), so this batch is cut with it."""
        for layer in check_full_attention(self.cache, "KV cache").layers:
            layer.keys, layer.values = layer.keys[:, :, :slots], layer.values[:, :, :slots]
        return CachedBatch(self.cache, self.mask[:, :slots])


def realign(parts: Sequence[tuple[CachedBatch, int, int]]) -> CachedBatch:
    """A left-padded batch whose row i holds the first n_i real tokens of row r_i of batch b_i, for parts
    (b_i, r_i, n_i): one index gather over the keys and values of every layer. Padding slots are zero."""
    sources: list[CachedBatch] = []
    for batch, _, _ in parts:
        if not any(batch is s for s in sources):
            sources.append(batch)
    offsets = torch.tensor([0] + [len(s.mask) for s in sources]).cumsum(0).tolist()
    slots = max(s.mask.shape[1] for s in sources)
    device = sources[0].mask.device
    width = max(n for _, _, n in parts)
    index = torch.zeros(len(parts), width, dtype=torch.int64, device=device)    # [R, W] source slot
    valid = torch.zeros(len(parts), width, dtype=torch.bool, device=device)     # [R, W]
    source_rows = []
    for i, (batch, row, n) in enumerate(parts):
        real = batch.mask[row].nonzero()[:, 0]
        if len(real) < n:
            raise ValueError(f"parts[{i}]: the row holds {len(real)} tokens, {n} asked for")
        index[i, width - n:] = real[:n]
        valid[i, width - n:] = True
        source_rows.append(offsets[next(j for j, s in enumerate(sources) if s is batch)] + row)
    rows = torch.tensor(source_rows, device=device)[:, None]                      # [R, 1]
    gathered = []
    for layer in zip(*(_layers(s.cache) for s in sources)):
        kv = []
        for tensors in zip(*layer):                                               # keys, then values
            stacked = tensors[0] if len(tensors) == 1 else torch.cat(
                [torch.nn.functional.pad(t, (0, 0, 0, slots - t.shape[2])) for t in tensors])  # [ΣB, H, S, D]
            picked = stacked[rows, :, index].transpose(1, 2)                      # [R, H, W, D]
            kv.append(torch.where(valid[:, None, :, None], picked, 0))
        gathered.append(tuple(kv))
    return CachedBatch(holding(gathered), valid)


def check_filled(cache: DynamicCache, slots: int, who: str) -> None:
    """RuntimeError naming `who` unless `cache` holds `slots` positions (the mask width) after a forward that was
    passed it as CACHE_KEYWORD: a model that left it unfilled would decode without its context."""
    held = cache.get_seq_length()
    if held != slots:
        raise RuntimeError(f"{who}: the model did not fill the KV cache passed as {CACHE_KEYWORD}= ({held} positions "
                           f"cached, {slots} expected) under transformers {transformers.__version__}; "
                           f"see trd_fast.dependencies for the supported versions")


def holding(layers: Sequence[tuple[Tensor, Tensor]]) -> DynamicCache:
    """A cache whose layers hold the given keys and values [B, H, S, D] themselves (built from empty slices and
    then set, so the tensors are not copied once more on the way in)."""
    cache = DynamicCache([(k[:, :, :0], v[:, :, :0]) for k, v in layers])
    for layer, (k, v) in zip(cache.layers, layers):
        layer.keys, layer.values = k, v
    return cache


def check_full_attention(cache: DynamicCache, who: str) -> DynamicCache:
    """The cache itself, when every layer is a plain full-attention layer (the only kind rows can be cut from
    and realigned in); else ValueError naming `who`."""
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if kinds:
        raise ValueError(f"{who}: only full-attention models are supported, this one's KV cache has {kinds} layers")
    return cache


def _layers(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in check_full_attention(cache, "KV cache").layers]
