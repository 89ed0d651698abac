"""Precision: long rows (online rescaling), fp64 inputs, output dtypes, bf16/fp16 relative to torch computed in
the same dtype, and agreement between backends."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (DIVERGENCES, FP32, assert_matches, check_against_oracle, evaluate, rand, randn,
                      require_backend)

import trd_fast
from trd_fast import reference

DIVERGENCE_IDS = [d for d, _ in DIVERGENCES]
HALF = (torch.bfloat16, torch.float16)


def trending(rows, vocab, *, seed):
    """Logits whose row maximum sits in the last block (even rows) or the first (odd rows): a streaming pass
    must rescale its running sums when a later block raises the maximum."""
    x = randn(rows, vocab, seed=seed) + torch.linspace(0, 30, vocab)
    x[1::2] = x[1::2].flip(-1)
    return x


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_long_rows(backend, divergence, beta):
    rows, vocab = (2, 515) if backend == "triton" else (6, 5003)  # the interpreted tile is 16 wide
    student, teacher = trending(rows, vocab, seed=0), trending(rows, vocab, seed=1)
    teacher[0] = teacher[0].flip(-1)  # student and teacher maxima at opposite ends
    check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta, temperature=0.8,
                         reduction="none", grad_output=randn(rows, seed=2, scale=1.0))
    check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta, top_k=37)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_student_close_to_teacher(backend, divergence, beta, temperature):
    """The converged regime of distillation: LLM-like logits (offset 20, spread 3) and a student within 0.05
    of the teacher, so l ~ 1e-3. The log-ratios are small (|s - t| < 0.3), so l is well conditioned and must
    reach the fp32 tolerance: computing s / T and t / T before subtracting loses ~eps |s| / T instead."""
    rows, vocab = (3, 96) if backend == "triton" else (8, 1000)
    base = randn(rows, vocab, scale=3.0) + 20
    student, teacher = base + randn(rows, vocab, seed=1, scale=0.05), base
    check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta,
                         temperature=temperature)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)],
                         ids=DIVERGENCE_IDS + ["jsd0", "jsd1"])
def test_fp64_inputs_are_tight(backend, divergence, beta):
    """fp64 in, fp64 math: the gradient (fp64) within 1e-10 of the oracle; loss and per_token are fp32, so
    within fp32 rounding of it. Upstream gradients exactly representable in fp32 (the ops take them as fp32)."""
    student = randn(3, 4, 57, dtype=torch.float64)
    teacher = randn(3, 4, 50, seed=1, dtype=torch.float64)
    for kwargs in (dict(reduction="sum", temperature=0.7),
                   dict(reduction="none", grad_output=randn(3, 4, seed=2, scale=1.0).double(), top_k=9)):
        loss, per_token, grad = evaluate(student, teacher, backend=backend, divergence=divergence, beta=beta,
                                         **kwargs)
        ref_loss, ref_per_token, ref_grad = evaluate(student, teacher, backend="oracle", divergence=divergence,
                                                     beta=beta, **kwargs)
        assert grad.dtype == torch.float64 and per_token.dtype == torch.float32 and loss.dtype == torch.float32
        assert_matches(grad, ref_grad, rtol=1e-10, atol=1e-12)
        assert_matches(per_token, ref_per_token, rtol=2.5e-7, atol=1e-12)
        assert_matches(loss, ref_loss, rtol=2e-6, atol=1e-12)


def test_fp64_token_logprobs_are_tight(backend):
    logits = randn(3, 5, 41, dtype=torch.float64)
    ids = torch.randint(0, 41, (3, 5), generator=torch.Generator().manual_seed(0))
    upstream = randn(3, 5, seed=1, scale=1.0)  # fp32 values
    x, x64 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = trd_fast.token_logprobs(x, ids, temperature=1.3, backend=backend)
    out.backward(upstream)
    ref = reference.token_logprobs(x64, ids, 1.3)
    ref.backward(upstream.double())
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float64
    assert_matches(out, ref.detach(), rtol=2.5e-7, atol=1e-12)
    assert_matches(x.grad, x64.grad, rtol=1e-10, atol=1e-12)


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64),
               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_dtypes_may_differ(backend, student_dtype, teacher_dtype):
    """loss and per_token fp32, gradient in the student's dtype, values as accurate as the inputs allow."""
    if backend == "triton" and (student_dtype in HALF or teacher_dtype in HALF):
        pytest.skip("bf16/fp16 Triton is checked on GPU (the interpreter's bf16 arithmetic is unreliable)")
    student, teacher = randn(3, 4, 37, dtype=student_dtype), randn(3, 4, 37, seed=1, dtype=teacher_dtype)
    loss, per_token, grad = evaluate(student, teacher, backend=backend, divergence="jsd", beta=0.3)
    ref_loss, ref_per_token, ref_grad = evaluate(student, teacher, backend="oracle", divergence="jsd", beta=0.3)
    assert loss.dtype == torch.float32 and per_token.dtype == torch.float32 and grad.dtype == student_dtype
    assert_matches(per_token, ref_per_token, **FP32)
    assert_matches(loss, ref_loss, **FP32)
    rounding = torch.finfo(student_dtype).eps if student_dtype in HALF else 1e-5
    assert_matches(grad, ref_grad, rtol=rounding, atol=1e-6)


def idiomatic_per_token(student, teacher, divergence, beta, temperature):
    """The plain torch computation in the inputs' own dtype (what the error of bf16/fp16 is measured against)."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), dim=0)
    return (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1))


def assert_no_worse_than_torch(ours, same_dtype, exact, *, tol):
    """|ours - exact| <= 2 |torch in the same dtype - exact| + tol, elementwise."""
    ours_error = (ours.double() - exact).abs()
    bound = 2 * (same_dtype.double() - exact).abs() + tol
    worst = (ours_error - bound).argmax()
    assert (ours_error <= bound).all(), (f"error {ours_error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"
                                         f" at {worst}: exact {exact.flatten()[worst]:.6g}")


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_half_precision_relative_to_torch(half_backend, dtype, divergence, beta):
    student, teacher = randn(4, 6, 301, dtype=dtype), randn(4, 6, 301, seed=1, dtype=dtype)
    temperature = 0.9
    ours = evaluate(student, teacher, backend=half_backend, divergence=divergence, beta=beta,
                    temperature=temperature)
    exact = evaluate(student, teacher, backend="oracle", divergence=divergence, beta=beta, temperature=temperature)
    s = student.clone().requires_grad_()
    torch_per_token = idiomatic_per_token(s, teacher, divergence, beta, temperature)
    torch_loss = torch_per_token.mean()
    torch_loss.backward()
    assert ours[2].dtype == dtype
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the dtype's absolute resolution
    assert_no_worse_than_torch(ours[1], torch_per_token.detach(), exact[1], tol=1e-5 * exact[1].abs() + 1e-6)
    assert_no_worse_than_torch(ours[0], torch_loss.detach(), exact[0], tol=1e-5 * exact[0].abs() + 1e-6)
    assert_no_worse_than_torch(ours[2], s.grad, exact[2],
                               tol=torch.finfo(dtype).eps * exact[2].abs() + 1e-7 + tiny)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_half_precision_token_logprobs_relative_to_torch(half_backend, dtype):
    logits = randn(4, 6, 301, dtype=dtype)
    ids = torch.randint(0, 301, (4, 6), generator=torch.Generator().manual_seed(0))
    upstream = randn(4, 6, seed=1, scale=1.0)
    x, xt, x64 = logits.clone().requires_grad_(), logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours = trd_fast.token_logprobs(x, ids, temperature=0.9, backend=half_backend)
    ours.backward(upstream)
    same = F.log_softmax(xt / 0.9, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    same.backward(upstream.to(dtype))
    exact = reference.token_logprobs(x64, ids, 0.9)
    exact.backward(upstream.double())
    assert ours.dtype == torch.float32 and x.grad.dtype == dtype
    assert_no_worse_than_torch(ours.detach(), same.detach(), exact.detach(), tol=1e-5 * exact.detach().abs() + 1e-6)
    assert_no_worse_than_torch(x.grad, xt.grad, x64.grad, tol=torch.finfo(dtype).eps * x64.grad.abs() + 1e-7)


def rms_error(x, exact):
    return float((x.double() - exact.double()).pow(2).mean().sqrt())


def assert_within_torch_rounding(ours, same_dtype, exact):
    """The RMS error of `ours` against the float64 result is at most twice that of torch in the same dtype: both
    are fp32 rounding noise then (their ratio scatters around 1 with the inputs), while an error that grows with
    the logits' magnitude is 4x to 10^4x torch's at the magnitudes tested here."""
    ours_error, torch_error = rms_error(ours, exact), rms_error(same_dtype, exact)
    assert ours_error <= 2 * torch_error, f"RMS error {ours_error:.3g}, torch's {torch_error:.3g}"


def offset_rows(rows, vocab, *, offset, seed=0):
    """(student, teacher): LLM-like rows at a large magnitude, the teacher around `offset` and the student a close
    distribution around offset / 2 (softmax ignores the shift; fp32 arithmetic on the logits does not)."""
    base = randn(rows, vocab, seed=seed, scale=3.0)
    return base + randn(rows, vocab, seed=seed + 1, scale=0.5) + offset / 2, base + offset


LARGE = [(28.0, 0.7), (40.0, 1.0), (1e4, 1.0)]  # (teacher offset, temperature): logits / T ~ 40, 40, 1e4
LARGE_IDS = ["40-T0.7", "40", "1e4"]


@pytest.mark.parametrize("offset,temperature", LARGE, ids=LARGE_IDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_large_logits_no_worse_than_torch_fp32(kernel_backend, divergence, beta, offset, temperature):
    """Values and gradient within torch fp32's error against float64 at logits / T ~ 40 (an LLM's) and ~ 1e4. A
    log-normaliser A saved as one fp32 number puts ~ulp(A) into every log p of the backward (3e-4 relative at
    1e4); a value formed from the difference of the two normalisers, or logits scaled by 1 / T before the shift
    is subtracted, carry ~ulp of the logits likewise."""
    rows, vocab = (16, 96) if kernel_backend == "triton" else (8, 5000)
    student, teacher = offset_rows(rows, vocab, offset=offset)
    options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction="none",
                   grad_output=randn(rows, seed=3, scale=1.0))
    _, per_token, grad = evaluate(student, teacher, backend=kernel_backend, **options)
    _, exact_per_token, exact_grad = evaluate(student, teacher, backend="oracle", **options)
    s = student.clone().requires_grad_()
    torch_per_token = idiomatic_per_token(s, teacher, divergence, beta, temperature)
    torch_per_token.backward(options["grad_output"])
    assert_within_torch_rounding(per_token, torch_per_token.detach(), exact_per_token)
    assert_within_torch_rounding(grad, s.grad, exact_grad)


@pytest.mark.parametrize("offset,temperature", LARGE, ids=LARGE_IDS)
def test_token_logprobs_large_logits_no_worse_than_torch_fp32(kernel_backend, offset, temperature):
    """token_logprobs saves its lse for the backward as well: the same bound as the divergences."""
    rows, vocab = (16, 96) if kernel_backend == "triton" else (8, 5000)
    logits = randn(rows, vocab, scale=3.0) + offset
    ids = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))
    upstream = randn(rows, seed=1, scale=1.0)
    x, xt, x64 = logits.clone().requires_grad_(), logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours = trd_fast.token_logprobs(x, ids, temperature=temperature, backend=kernel_backend)
    ours.backward(upstream)
    same = F.log_softmax(xt / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    same.backward(upstream)
    exact = reference.token_logprobs(x64, ids, temperature)
    exact.backward(upstream.double())
    assert_within_torch_rounding(ours.detach(), same.detach(), exact.detach())
    assert_within_torch_rounding(x.grad, xt.grad, x64.grad)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_peaked_rows_give_exact_values(backend, divergence, beta):
    """A row peaked at logit 1e4 (the rest 0) against random rows, teacher peaked and student peaked, the peak
    in the first and in a later block: the value must reach fp32 accuracy. Formed as a difference of the two
    ~1e4 log-normalisers (or of logits ~1e4 apart) it would be off by up to ulp(1e4) / 2 = 5e-4."""
    vocab, late = (40, 35) if backend == "triton" else (5000, 4500)  # Triton's interpreted tiles are 16 wide
    peaked = torch.zeros(4, vocab)
    peaked[0, 3] = peaked[1, late] = peaked[2, 3] = peaked[3, late] = 1e4
    random = randn(4, vocab, seed=1, scale=1.0)
    for student, teacher in ((random, peaked), (peaked, random)):
        _, per_token, _ = evaluate(student, teacher, backend=backend, divergence=divergence, beta=beta,
                                   reduction="none")
        _, exact, _ = evaluate(student, teacher, backend="oracle", divergence=divergence, beta=beta,
                               reduction="none")
        assert_matches(per_token, exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("first,second", [("cpp", "torch"), ("triton", "torch"), ("triton", "cpp")])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_backends_agree(first, second, divergence, beta):
    """Every backend gives the same numbers (fp32), with every option in play."""
    require_backend(first)
    require_backend(second)
    student, teacher = randn(3, 5, 67), randn(3, 5, 61, seed=1)
    kwargs = dict(divergence=divergence, beta=beta, temperature=1.4, clip=2.5, weight=rand(3, 5, seed=2),
                  normalizer=torch.tensor(6.0))
    for options in (kwargs, dict(kwargs, top_k=7)):
        a = evaluate(student, teacher, backend=first, **options)
        b = evaluate(student, teacher, backend=second, **options)
        for x, y in zip(a, b):
            assert_matches(x, y, rtol=2e-5, atol=2e-6)
    logits, ids = randn(3, 5, 67, seed=3), torch.randint(0, 67, (3, 5), generator=torch.Generator().manual_seed(4))
    assert_matches(trd_fast.token_logprobs(logits, ids, backend=first),
                   trd_fast.token_logprobs(logits, ids, backend=second), rtol=2e-5, atol=2e-6)
    signal, lengths = rand(3, 11, seed=5), torch.tensor([11, 4, 0])
    for x, y in zip(trd_fast.prefix_scan(signal, lengths, threshold=0.55, window=3, backend=first),
                    trd_fast.prefix_scan(signal, lengths, threshold=0.55, window=3, backend=second)):
        assert_matches(x, y, rtol=1e-6, atol=1e-6)
