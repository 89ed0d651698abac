"""rollout/kv_cache.py's GrowingLayer holds exactly what HF's concatenating DynamicLayer holds through prefills,
decode steps and crops, writes decode steps in place (its buffers are replaced only a logarithmic number of times),
and never writes into tensors it was given."""

import math

import torch
from transformers.cache_utils import DynamicLayer

from trd_fast.trainer.rollout.kv_cache import GROWTH, MIN_ROOM, GrowingLayer, holding

BATCH, HEADS, DIM = 3, 2, 4


def states(width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(BATCH, HEADS, width, DIM, generator=generator) for _ in range(2))


def cut(layer, slots: int) -> None:
    """CachedBatch.crop's cut of one layer."""
    layer.keys, layer.values = layer.keys[:, :, :slots], layer.values[:, :, :slots]


def test_a_growing_layer_holds_what_concatenation_holds():
    generator = torch.Generator().manual_seed(0)
    growing, reference = GrowingLayer(), DynamicLayer()
    # a prefill, decode steps, verify forwards of 4 cut back after each, a long multi-token forward
    plan = [("feed", 7)] + [("feed", 1)] * 70 + [("feed", 4), ("cut", -2)] * 30 + [("feed", 150), ("feed", 1)]
    for action, width in plan:
        if action == "cut":
            for layer in (growing, reference):
                cut(layer, layer.keys.shape[-2] + width)
            continue
        new = states(width, generator)
        got = growing.update(*new)
        want = reference.update(*new)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert torch.equal(growing.keys, reference.keys) and torch.equal(growing.values, reference.values)


def test_decode_steps_write_in_place():
    generator = torch.Generator().manual_seed(1)
    layer, replaced = GrowingLayer(), 0
    prompt, steps = 10, 500
    layer.update(*states(prompt, generator))
    for _ in range(steps):
        room = layer.room
        layer.update(*states(1, generator))
        replaced += layer.room is not room
        assert layer.keys.data_ptr() == layer.room[0].data_ptr()        # the cache is a view of the buffer
        assert layer.room[0].shape[-2] <= layer.keys.shape[-2] * (1 + GROWTH) + MIN_ROOM
    # each replacement makes the buffer GROWTH larger: about log(total / first) / log(1 + GROWTH) of them
    first = prompt + MIN_ROOM
    assert 0 < replaced <= math.ceil(math.log((prompt + steps) / first) / math.log(1 + GROWTH))
    assert layer.keys.shape[-2] == prompt + steps


def test_tensors_it_was_given_are_never_written():
    generator = torch.Generator().manual_seed(2)
    given = states(5, generator)
    kept = tuple(t.clone() for t in given)
    cache = holding([given])
    layer = cache.layers[0]
    assert layer.keys is given[0]                                       # held as they are, not copied on the way in
    new = states(1, generator)
    keys, values = layer.update(*new)
    assert torch.equal(given[0], kept[0]) and torch.equal(given[1], kept[1])
    assert torch.equal(keys, torch.cat([kept[0], new[0]], dim=-2))
    assert torch.equal(values, torch.cat([kept[1], new[1]], dim=-2))
    assert keys.data_ptr() != given[0].data_ptr()
