"""The C++ backward hands out large gradient buffers again once nothing references them: never one still in use
(by a tensor, a view or autograd's accumulated .grad), and a reused buffer gives exactly the gradient a fresh one
gives, every column and row written."""

import pytest
import torch
from conftest import FP32, assert_matches, evaluate, gradient_tolerance, randn, require_backend

import trd_fast
from trd_fast.ops import registry

ROWS, VOCAB = 4, 1 << 20  # a 16 MiB fp32 gradient: the size from which buffers are kept for reuse


@pytest.fixture
def extension():
    """trd_fast._C with no buffer kept, before and after the test."""
    require_backend("cpp")
    registry.EXTENSION.release_gradient_buffers()
    yield registry.EXTENSION
    registry.EXTENSION.release_gradient_buffers()


def gradient(student, teacher, **kwargs):
    x = student.detach().requires_grad_()
    (grad,) = torch.autograd.grad(trd_fast.distillation_loss(x, teacher, backend="cpp", **kwargs), x)
    return grad


def test_a_freed_buffer_is_reused_and_fully_rewritten(extension):
    student, teacher = randn(ROWS, VOCAB), randn(ROWS, VOCAB, seed=1)
    first = gradient(student, teacher, divergence="reverse_kl")
    address = first.data_ptr()
    del first
    # a narrower teacher (the columns beyond it must become 0) and a zero-weight row (all 0): nothing of the
    # previous gradient, still in the buffer, may survive
    narrow = teacher[:, : VOCAB - 100]
    options = dict(divergence="forward_kl", weight=torch.tensor([1.0, 0.0, 2.0, 1.0]))
    reused = gradient(student, narrow, **options)
    assert reused.data_ptr() == address
    assert extension.release_gradient_buffers() == 0  # the reused buffer is in use, none is kept
    fresh = gradient(student, narrow, **options)
    assert torch.equal(reused, fresh)
    assert torch.equal(reused[1], torch.zeros(VOCAB)) and torch.equal(reused[:, VOCAB - 100:], torch.zeros(ROWS, 100))


def test_a_referenced_buffer_is_never_handed_out(extension):
    student, teacher = randn(ROWS, VOCAB), randn(ROWS, VOCAB, seed=1)
    first = gradient(student, teacher)
    view = first[1:]  # keeps the storage alive after `first` goes
    kept = view.clone()
    del first
    second = gradient(student, teacher, divergence="jsd", beta=0.3)
    assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    assert torch.equal(view, kept)


def test_accumulated_grad_stays_correct_across_reuse(extension):
    """.backward() accumulates into x.grad, which may take over the first gradient's buffer: the later calls'
    buffers are freed and reused while x.grad holds its own."""
    student, teacher = randn(ROWS, VOCAB), randn(ROWS, VOCAB, seed=1)
    x = student.clone().requires_grad_()
    for _ in range(3):
        trd_fast.distillation_loss(x, teacher, divergence="reverse_kl", backend="cpp").backward()
    _, per_token, once = evaluate(student, teacher, backend="oracle", divergence="reverse_kl")
    assert_matches(x.grad, 3 * once, **gradient_tolerance(FP32, per_token, grad_output=torch.tensor(3.0)))


def test_token_logprobs_gradients_share_the_buffers(extension):
    logits = randn(ROWS, VOCAB)
    ids = torch.tensor([0, 5, -100, VOCAB - 1])
    x = logits.clone().requires_grad_()
    (first,) = torch.autograd.grad(trd_fast.token_logprobs(x, ids, backend="cpp").sum(), x)
    expected = first.clone()
    del first
    reused = gradient(logits, randn(ROWS, VOCAB, seed=1))
    del reused
    (again,) = torch.autograd.grad(trd_fast.token_logprobs(x, ids, backend="cpp").sum(), x)
    assert torch.equal(again, expected)


def test_at_most_two_buffers_are_kept(extension):
    student, teacher = randn(ROWS, VOCAB), randn(ROWS, VOCAB, seed=1)
    gradients = [gradient(student, teacher) for _ in range(3)]  # three live at once: three buffers
    assert len({g.data_ptr() for g in gradients}) == 3
    del gradients
    assert extension.release_gradient_buffers() == 2 * ROWS * VOCAB * 4
