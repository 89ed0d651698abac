"""The fused linear loss's CPU tile buffer, kept from one call to the next (fused_linear_tiles), and the scalar
loss's backward with an upstream gradient of 1: values and gradients against the float64 oracle."""

import pytest
import torch
from conftest import assert_matches, randn, require_backend

import trd_fast
from trd_fast.ops import fused_linear_blocks
from trd_fast.ops.fused_linear_tiles import kept_tile_bytes, release_tile_buffers

N, H, V = 40, 16, 300
TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def no_kept_tiles(monkeypatch):
    monkeypatch.setitem(fused_linear_blocks.TILE_BUDGET_BYTES, "cpu", 2 * 10 * V * 4)  # blocks of 10 rows
    release_tile_buffers()
    yield
    release_tile_buffers()


def inputs(n=N, seed=0):
    return (randn(n, H, seed=seed, scale=1.0), randn(V, H, seed=seed + 1, scale=0.4),
            randn(n, 2 * H, seed=seed + 2, scale=1.0), randn(V, 2 * H, seed=seed + 3, scale=0.3))


def loss_and_gradients(args, backend, upstream=1.0, **options):
    hidden, weight = (t.detach().clone().requires_grad_() for t in args[:2])
    loss = trd_fast.fused_linear_distillation_loss(hidden, weight, *args[2:], backend=backend, **options)
    loss.backward(torch.full_like(loss, upstream))
    return loss.detach(), hidden.grad, weight.grad


def assert_oracle(args, upstream=1.0, **options):
    ours = loss_and_gradients(args, require_backend("cpp"), upstream, **options)
    oracle = loss_and_gradients([a.double() for a in args], "torch", upstream, **options)
    for actual, expected in zip(ours, oracle):
        assert_matches(actual, expected, **TOL)


def tile_allocations(fn) -> list[int]:
    """Sizes in bytes of the allocations of at least one tile ([10, V] fp32) while fn() runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if not e.cpu_children and e.cpu_memory_usage >= 10 * V * 4]


def test_second_call_allocates_no_tiles():
    """The first call allocates both tiles (one buffer) and leaves it; the second allocates none, and
    release_tile_buffers() frees exactly that buffer."""
    args = inputs()
    first = tile_allocations(lambda: assert_oracle(args))
    tiles = 2 * 10 * V * 4
    assert tiles in first and kept_tile_bytes() == tiles
    assert tiles not in tile_allocations(lambda: assert_oracle(args))
    assert release_tile_buffers() == tiles and kept_tile_bytes() == 0


@pytest.mark.parametrize("options", [dict(), dict(reduction="none"), dict(student_softcap=4.0, top_k=7),
                                     dict(divergence="jsd", beta=0.3)], ids=["mean", "none", "softcap-top_k", "jsd"])
def test_kept_buffer_of_a_larger_call(monkeypatch, options):
    """A call on a kept buffer larger than its tiles (left by a call of bigger blocks) and full of that call's
    logits matches the oracle, and the larger buffer stays kept."""
    assert_oracle(inputs(n=33, seed=5))
    kept = kept_tile_bytes()
    monkeypatch.setitem(fused_linear_blocks.TILE_BUDGET_BYTES, "cpu", 2 * 3 * V * 4)  # blocks of 3 rows
    assert_oracle(inputs(seed=1), upstream=0.7, **options)
    assert kept_tile_bytes() == kept


def test_unit_upstream_gradient_is_not_a_pass():
    """loss.backward() on a scalar loss returns the gradients computed in the forward without multiplying
    them by 1; another upstream gradient scales them (both against the oracle)."""
    from torch.profiler import ProfilerActivity, profile
    args = inputs()
    hidden, weight = (t.detach().clone().requires_grad_() for t in args[:2])
    loss = trd_fast.fused_linear_distillation_loss(hidden, weight, *args[2:], backend=require_backend("cpp"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    assert not [e for e in prof.events() if e.name in ("aten::mul_", "aten::mul")]
    assert_oracle(args)
    assert_oracle(args, upstream=2.5)
