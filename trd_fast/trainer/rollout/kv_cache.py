"""A batch of token rows held in a KV cache, with a mask of the slots that hold real tokens. Rows can leave the
batch, and rows of several batches can be cut back to a prefix and realigned into one left-padded batch. The cache's
layers keep room to grow, so a decode step writes its tokens in place instead of copying the whole cache."""

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

GROWTH = 0.25   # a layer's buffers, when full at S slots, are replaced by ones of S * (1 + GROWTH) slots (at least
MIN_ROOM = 64   # MIN_ROOM more): growing copies each cached token about 1 / GROWTH times in all


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

    def keep_rows(self, rows: Tensor) -> CachedBatch:
        """select(rows), and this batch's cache emptied: its tensors are freed even while a caller still holds this
        batch (a decode loop's first batch), and using it afterwards fails instead of reading stale keys."""
        kept = self.select(rows)
        for layer in check_full_attention(self.cache, "KV cache").layers:
            layer.keys = layer.values = None
            if isinstance(layer, GrowingLayer):
                layer.room = (None, None)
        return kept

    def crop(self, slots: int) -> CachedBatch:
        """The batch cut to its first `slots` slots. The cache is cut in place (each layer keeps a view of its
        first slots, and the next forward writes over the slots cut off: GrowingLayer), so this batch is cut with
        it: no batch sharing the cache may be read past `slots` afterwards."""
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


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values [B, H, S, D] are the first S slots of buffers with room for
    more: a forward's new keys and values are written in place, and full buffers are replaced by ones GROWTH larger.
    HF's DynamicLayer concatenates instead, copying the whole cache at every forward: O(S) per decode step, O(L^2)
    over a rollout of L tokens. Keys and values set from outside (holding) are copied into new buffers at the next
    update; a crop (CachedBatch.crop) leaves them views of the buffers' first slots, and the next update writes over
    the slots cut off, which no view held on to still reads."""

    def __init__(self):
        super().__init__()
        self.room: tuple[Tensor | None, Tensor | None] = (None, None)   # the buffers [B, H, C, D] keys, values

    def reset(self) -> None:
        super().reset()
        self.room = (None, None)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        total = held + key_states.shape[-2]
        pairs = zip((self.keys, self.values), self.room, (key_states, value_states))
        if not all(_has_room(old, buffer, new, total) for old, buffer, new in pairs):
            size = total + max(int(total * GROWTH), MIN_ROOM)
            self.room = tuple(new.new_empty(*new.shape[:2], size, new.shape[-1]) for new in (key_states, value_states))
            if held:
                self.room[0][:, :, :held], self.room[1][:, :, :held] = self.keys, self.values
        keys, values = self.room
        keys[:, :, held:total], values[:, :, held:total] = key_states, value_states
        self.keys, self.values = keys[:, :, :total], values[:, :, :total]
        return self.keys, self.values


def growing_cache(config, who: str) -> DynamicCache:
    """An empty KV cache for a model of `config` whose layers grow in place (GrowingLayer); ValueError naming `who`
    unless every layer is full attention."""
    cache = check_full_attention(DynamicCache(config=config), who)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def _has_room(held: Tensor, buffer: Tensor | None, new: Tensor, total: int) -> bool:
    """`buffer` [B, H, C, D] can take `new` [B, H, W, D] after the cached `held` up to slot `total`: same rows, heads,
    width and dtype, C >= total, and `held` is its first slots (or holds none)."""
    return (buffer is not None and buffer.shape[-2] >= total and buffer.dtype == new.dtype
            and buffer.shape[:2] == new.shape[:2] and buffer.shape[-1] == new.shape[-1]
            and (held.dim() != 4 or held.shape[-2] == 0
                 or (held.data_ptr() == buffer.data_ptr() and held.stride() == buffer.stride())))


def check_filled(cache: DynamicCache, slots: int, who: str) -> None:
    """RuntimeError naming `who` unless `cache` holds `slots` positions (the mask width) after a forward that was
    passed it as CACHE_KEYWORD: a model that left it unfilled would decode without its context."""
    held = cache.get_seq_length()
    if held != slots:
        raise RuntimeError(f"{who}: the model did not fill the KV cache passed as {CACHE_KEYWORD}= ({held} positions "
                           f"cached, {slots} expected) under transformers {transformers.__version__}; "
                           f"see trd_fast.dependencies for the supported versions")


def holding(layers: Sequence[tuple[Tensor, Tensor]]) -> DynamicCache:
    """A cache of GrowingLayers holding the given keys and values [B, H, S, D] themselves (not copied on the way in;
    the first update copies them into buffers with room)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in layers]
    for layer, (k, v) in zip(cache.layers, layers):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def check_full_attention(cache: DynamicCache, who: str) -> DynamicCache:
    """The cache itself, when every layer is a plain full-attention layer (the only kind rows can be cut from
    and realigned in); else ValueError naming `who`."""
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in (DynamicLayer, GrowingLayer)})
    if kinds:
        raise ValueError(f"{who}: only full-attention models are supported, this one's KV cache has {kinds} layers")
    return cache


def _layers(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in check_full_attention(cache, "KV cache").layers]
