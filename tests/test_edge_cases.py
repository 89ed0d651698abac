"""-inf (banned tokens), infinite divergences, NaN inputs and zero weights, on every backend."""

import pytest
import torch
from conftest import DIVERGENCES, FP32, assert_matches, check_against_oracle, evaluate, randn

import trd_fast

INF = float("inf")
DIVERGENCE_IDS = [d for d, _ in DIVERGENCES]


def banned(x, rows, cols):
    """A copy of x with x[rows, cols] = -inf (every row in `rows` x every column in `cols`)."""
    x = x.clone()
    for r in rows:
        x[r, cols] = -INF
    return x


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_tokens_banned_by_both(backend, divergence, beta):
    student = banned(randn(6, 23), range(6), [0, 5, 22])
    teacher = banned(randn(6, 23, seed=1), range(6), [0, 5, 22])
    loss, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                                 beta=beta, temperature=0.9)
    assert torch.isfinite(per_token).all() and torch.isfinite(loss)
    assert torch.equal(grad[:, [0, 5, 22]], torch.zeros(6, 3))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_teacher_bans_tokens_the_student_likes(backend, divergence, beta):
    """q = 0 where p > 0: finite forward_kl and jsd; reverse_kl is +inf with a zero gradient row."""
    student = randn(6, 23)
    teacher = banned(randn(6, 23, seed=1), [1, 4], [2, 3, 9])
    grad_output = randn(6, seed=2, scale=1.0)
    _, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                              beta=beta, reduction="none", grad_output=grad_output)
    assert not per_token.isnan().any() and not grad.isnan().any()
    if divergence == "reverse_kl":
        assert torch.equal(per_token[[1, 4]], torch.full((2,), INF))
        assert torch.equal(grad[[1, 4]], torch.zeros(2, 23))
    else:
        assert torch.isfinite(per_token).all()
    assert torch.isfinite(per_token[[0, 2, 3, 5]]).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_student_bans_tokens_the_teacher_likes(backend, divergence, beta):
    """p = 0 where q > 0: forward_kl is +inf (not NaN) with a zero gradient row; the mean loss is +inf."""
    student = banned(randn(6, 23), [0, 3], [4, 17])
    teacher = randn(6, 23, seed=1)
    loss, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                                 beta=beta)
    assert not per_token.isnan().any() and not grad.isnan().any()
    assert torch.isfinite(grad).all()
    if divergence == "forward_kl":
        assert torch.equal(per_token[[0, 3]], torch.full((2,), INF))
        assert loss == INF
        assert torch.equal(grad[[0, 3]], torch.zeros(2, 23))
        assert (grad[[1, 2, 4, 5]].abs().sum(-1) > 0).all()
    else:
        assert torch.isfinite(per_token).all()


def test_clip_caps_an_infinite_divergence(backend):
    student = banned(randn(5, 19), [2], [0, 1])
    teacher = randn(5, 19, seed=1)
    loss, per_token, grad = check_against_oracle(student, teacher, backend=backend, clip=1.5, reduction="none",
                                                 grad_output=randn(5, seed=3, scale=1.0))
    assert per_token[2] == INF and loss[2] == 1.5
    assert torch.equal(grad[2], torch.zeros(19))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_weight_hides_inf_and_nan(backend, divergence, beta, reduction):
    """w == 0 positions contribute exactly 0 to loss and gradient, even when l is inf or NaN."""
    student = banned(randn(6, 23), [1], [3, 4])  # forward_kl: inf at position 1
    student = banned(student, [5], list(range(23)))  # all -inf: NaN at position 5 for every divergence
    teacher = banned(randn(6, 23, seed=1), [2], [0, 7])  # reverse_kl: inf at position 2
    teacher[4, 6] = float("nan")  # NaN at position 4
    weight = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    grad_output = randn(6, seed=2, scale=1.0) if reduction == "none" else None
    loss, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                                 beta=beta, weight=weight, reduction=reduction,
                                                 grad_output=grad_output)
    assert torch.isfinite(loss).all()
    assert per_token[[4, 5]].isnan().all()
    assert torch.equal(grad[weight == 0], torch.zeros(4, 23))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_all_minus_inf_row_is_nan_unless_weighted_zero(backend, divergence, beta, side):
    student, teacher = randn(4, 17), randn(4, 17, seed=1)
    if side == "student":
        student = banned(student, [2], list(range(17)))
    else:
        teacher = banned(teacher, [2], list(range(17)))
    loss, per_token = trd_fast.distillation_loss(student, teacher, divergence=divergence, beta=beta,
                                                 return_per_token=True, backend=backend)
    assert loss.isnan() and per_token[2].isnan()
    _, ref_per_token, _ = evaluate(student, teacher, backend="oracle", divergence=divergence, beta=beta)
    assert_matches(per_token[[0, 1, 3]], ref_per_token[[0, 1, 3]], **FP32)
    weight = torch.tensor([True, True, False, True])
    loss, _, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta,
                                         weight=weight)
    assert torch.isfinite(loss) and torch.equal(grad[2], torch.zeros(17))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_input_poisons_its_position_only(backend, divergence, beta, side):
    student, teacher = randn(5, 19), randn(5, 19, seed=1)
    (student if side == "student" else teacher)[3, 11] = float("nan")
    grad_output = randn(5, seed=4, scale=1.0)
    loss, per_token, grad = evaluate(student, teacher, backend=backend, divergence=divergence, beta=beta,
                                     reduction="none", grad_output=grad_output)
    ref_loss, ref_per_token, ref_grad = evaluate(student, teacher, backend="oracle", divergence=divergence,
                                                 beta=beta, reduction="none", grad_output=grad_output)
    assert per_token[3].isnan() and loss[3].isnan()
    others = [0, 1, 2, 4]
    assert_matches(per_token[others], ref_per_token[others], **FP32)
    assert_matches(loss[others], ref_loss[others], **FP32)
    assert_matches(grad[others], ref_grad[others], **FP32)


@pytest.mark.parametrize("top_k", [6, 15, 40])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_top_k_and_banned_teacher_tokens(backend, divergence, beta, top_k):
    """top_k of a teacher with 6 finite ids per row: exactly those (k = 6), or every column, banned ones with
    q = 0 included (k >= V). (A k in between would pick among tied -inf ids: arbitrary by contract.)"""
    teacher = banned(randn(4, 15, seed=1), range(4), list(range(6, 15)))
    student = banned(randn(4, 15), [1], [12])  # a student ban outside the teacher's support
    _, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                              beta=beta, top_k=top_k)
    assert not grad.isnan().any() and not per_token.isnan().any()
    if top_k == 6:
        assert torch.equal(grad[:, 6:], torch.zeros(4, 9))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_sparse_teacher_with_minus_inf_logprobs(backend, divergence, beta):
    ids = torch.tensor([[3, 0, 7, -1], [1, 2, -1, -1], [9, 4, 5, 6]])
    logprobs = torch.tensor([[-0.5, -INF, -1.5, 0.0], [-0.1, -2.0, 0.0, 0.0], [-1.0, -1.0, -3.0, -INF]])
    teacher = trd_fast.SparseTeacher(ids, logprobs)
    _, per_token, grad = check_against_oracle(randn(3, 10), teacher, backend=backend, divergence=divergence,
                                              beta=beta, reduction="sum")
    assert not per_token.isnan().any() and not grad.isnan().any()


EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("offset,scale,temperature", [(120.0, 15.0, 1.0), (-120.0, 15.0, 1.0), (0.0, 60.0, 3.0),
                                                      (1e4, 15.0, 1.0), (-1e4, 15.0, 1.0)],
                         ids=["+120", "-120", "spread", "+1e4", "-1e4"])
def test_large_magnitude_logits(backend, offset, scale, temperature):
    """Logits whose exp overflows fp32 (|x| > 88), or spread over hundreds: online max/sum rescaling must keep
    everything finite and accurate.

    fp32 logits near 1e4 are themselves known only to ~1e-3 absolute: there the bound is the backward-stable
    one: the exact result for logits perturbed by delta = 8 eps |x| / T, i.e. delta relative on the values
    and delta / N absolute on the gradient of a mean over N positions."""
    student = randn(4, 33, scale=scale) + offset
    teacher = randn(4, 33, seed=1, scale=scale) + offset
    delta = 8 * EPS32 * float(torch.cat([student, teacher]).abs().max()) / temperature
    tol = dict(rtol=delta, atol=delta / 4) if delta > 1e-3 else dict(rtol=1e-5, atol=1e-6)
    for divergence, beta in DIVERGENCES:
        _, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                                  beta=beta, temperature=temperature, tol=tol)
        assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
