"""token_logprobs on every backend against the float64 reference: values, gradients, ignored ids."""

import pytest
import torch
from conftest import FP32, assert_matches, randn

import trd_fast
from trd_fast import reference

IGNORE = -100

# name: (logits base shape, view)
SHAPES = {
    "2d": ((7, 37), None),
    "3d": ((2, 3, 50), None),
    "4d": ((2, 2, 2, 19), None),
    "V=1": ((5, 1), None),
    "N=0": ((0, 16), None),
    "sliced": ((2, 6, 29), lambda x: x[:, :-1]),
    "transposed": ((29, 6), lambda x: x.t()),
}


def token_ids(lead, vocab, *, seed=0, ignore=0.25):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, lead, generator=generator)
    return torch.where(torch.rand(lead, generator=generator) < ignore, torch.full_like(ids, IGNORE), ids)


def run(logits, ids, *, backend, temperature=1.0, view=None, grad_output=None):
    """(logprobs, grad of the base logits) on `backend`, or of the float64 oracle for "oracle"."""
    base = logits.detach().double() if backend == "oracle" else logits.detach().clone()
    base.requires_grad_()
    x = view(base) if view is not None else base
    if backend == "oracle":
        out = reference.token_logprobs(x, ids, temperature)
    else:
        out = trd_fast.token_logprobs(x, ids, temperature=temperature, backend=backend)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output.to(out.dtype))
    return out.detach(), base.grad


def check(logits, ids, *, backend, tol=FP32, **kwargs):
    out, grad = run(logits, ids, backend=backend, **kwargs)
    ref_out, ref_grad = run(logits, ids, backend="oracle", **kwargs)
    assert out.dtype == torch.float32 and out.shape == ids.shape
    assert grad.dtype == logits.dtype
    assert_matches(out, ref_out, **tol)
    assert_matches(grad, ref_grad, **tol)
    return out, grad


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(backend, shape, temperature):
    base_shape, view = SHAPES[shape]
    logits = randn(*base_shape)
    lead = (view(logits) if view else logits).shape[:-1]
    ids = token_ids(lead, (view(logits) if view else logits).shape[-1], seed=1)
    check(logits, ids, backend=backend, temperature=temperature, view=view,
          grad_output=randn(*lead, seed=2, scale=1.0))


def test_ignored_ids_give_zero_and_no_gradient(backend):
    logits = randn(6, 21)
    ids = torch.tensor([3, IGNORE, 0, 20, IGNORE, IGNORE])
    out, grad = check(logits, ids, backend=backend, grad_output=randn(6, seed=1, scale=1.0))
    ignored = ids == IGNORE
    assert torch.equal(out[ignored], torch.zeros(3))
    assert torch.equal(grad[ignored], torch.zeros(3, 21))
    assert (out[~ignored] < 0).all()


def test_all_ignored(backend):
    logits = randn(3, 4, 9)
    out, grad = run(logits, torch.full((3, 4), IGNORE), backend=backend)
    assert torch.equal(out, torch.zeros(3, 4)) and torch.equal(grad, torch.zeros(3, 4, 9))


def test_int32_ids(backend):
    logits = randn(5, 13)
    ids = token_ids((5,), 13, seed=3).to(torch.int32)
    check(logits, ids, backend=backend)


def test_minus_inf_logits(backend):
    """A banned token's log-prob is -inf; other tokens see it as zero probability."""
    logits = randn(4, 11)
    logits[:, 2] = -float("inf")
    ids = torch.tensor([2, 5, 0, IGNORE])
    out, grad = check(logits, ids, backend=backend)
    assert out[0] == -float("inf")
    assert torch.isfinite(out[1:]).all() and not grad[1:].isnan().any()


def test_nan_logit_poisons_its_position_only(backend):
    logits = randn(4, 11)
    logits[1, 7] = float("nan")
    ids = torch.tensor([1, 3, 7, 10])
    out, grad = run(logits, ids, backend=backend)
    ref_out, ref_grad = run(logits, ids, backend="oracle")
    assert out[1].isnan()
    assert_matches(out[[0, 2, 3]], ref_out[[0, 2, 3]], **FP32)
    assert_matches(grad[[0, 2, 3]], ref_grad[[0, 2, 3]], **FP32)


def test_large_vocab_online_rescaling(backend):
    """The row maximum at the end of a long row (later blocks rescale the running sum)."""
    vocab = 515 if backend == "triton" else 5003  # the interpreted tile is 16 wide
    logits = randn(3, vocab) + torch.linspace(0, 30, vocab)
    logits[1] = logits[1].flip(0)  # the maximum first
    check(logits, torch.tensor([vocab - 1, 0, vocab // 3]), backend=backend, temperature=0.9)
