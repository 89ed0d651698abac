"""GPU-only checks of the Triton backend: compiled kernels (not the interpreter) on CUDA tensors.

bf16 / fp16 accuracy judged against the same-dtype torch computation (|ours - fp64| <= 2 |torch - fp64| + tol),
every autotune candidate, torch.library.opcheck over the six ops, torch.compile(fullgraph=True), no host
synchronisation, and the device-side assert on bad token ids. Everything skips without CUDA, and under
TRITON_INTERPRET=1 (which would run the interpreter instead of the compiled kernels): run these with
TRITON_INTERPRET=0 on a GPU machine.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import trd_fast
from trd_fast import reference
from trd_fast.constants import DIVERGENCES

try:
    from trd_fast.kernels.configs import STREAM_TILES_GPU
except ImportError:  # triton not installed: everything below skips
    STREAM_TILES_GPU = ()

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset)")

KINDS = {name: code for code, name in enumerate(DIVERGENCES)}  # divergence -> kernel code


def ops():
    from trd_fast.ops import triton_ops  # registered at import of trd_fast.ops when CUDA is available

    return triton_ops


def logits(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def banned_mask(*shape, seed=1):
    """~2% of the columns of each row (never column 0, so no row is empty)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(shape, generator=g, device="cuda") < 0.02
    mask[..., 0] = False
    return mask


def with_banned(x, mask):
    """x with -inf logits (banned tokens) where mask is set, over mask's columns."""
    x = x.clone()
    width = mask.shape[-1]
    x[..., :width] = x[..., :width].masked_fill(mask, float("-inf"))
    return x


def assert_no_worse_than_torch(ours, theirs, exact, eps, atol):
    """|ours - exact| <= 2 |theirs - exact| + eps |exact| + atol elementwise, same NaN / inf pattern."""
    ours, theirs, exact = ours.double(), theirs.double(), exact.double()
    assert torch.equal(torch.isnan(ours), torch.isnan(exact))
    finite = torch.isfinite(exact)
    assert torch.equal(ours[~finite & ~torch.isnan(exact)], exact[~finite & ~torch.isnan(exact)])
    bound = 2 * (theirs - exact).abs() + eps * exact.abs() + atol
    excess = torch.where(finite, (ours - exact).abs() - bound, -torch.inf)
    assert excess.max().item() <= 0, worst(excess, ours=ours, torch=theirs, exact=exact, bound=bound)


def worst(excess, **tensors):
    """The element where `excess` is largest, with each tensor's value there (a GPU failure's details)."""
    at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
    values = ", ".join(f"{name} {float(t.broadcast_to(excess.shape)[at]):.6g}" for name, t in tensors.items())
    return f"worst excess {float(excess[at]):.3g} at {at}: {values}"


def value_atol(student, teacher, temperature):
    """fp32 rounding of the log-ratio terms a divergence averages: ~ eps * max |s - t| / T (see conftest)."""
    width = min(student.shape[-1], teacher.shape[-1])
    gap = (student[..., :width].double() - teacher[..., :width].double()).abs()
    gap = gap[torch.isfinite(gap)]
    return max(1e-6, 8 * torch.finfo(torch.float32).eps * float(gap.max()) / temperature)


def gradient_atol(student, teacher, temperature, gradient):
    """Elementwise fp32 rounding of the kernels' gradient: position i's is p_i (or q_i) / T times a difference of
    log-probabilities, each rounded at its magnitude L (|z| / T plus the log-normalizer; exp and log run at the
    GPU's approximate precision), and the difference may cancel (jsd: log(p_i / M_i) against its row mean). So
    8 eps (p_i + q_i) L / T, plus 1e-4 of the largest |gradient| (exact: fp64)."""
    width = min(student.shape[-1], teacher.shape[-1])
    p, q = (torch.softmax(z[..., :width].double() / temperature, -1) for z in (student, teacher))
    finite = [z[torch.isfinite(z)].abs().max() for z in (student, teacher)]
    magnitude = 2 * float(max(finite)) / temperature + math.log(width)
    bound = 8 * torch.finfo(torch.float32).eps * (p + q) * magnitude / temperature
    bound = torch.nn.functional.pad(bound, (0, student.shape[-1] - width))  # columns past the common vocabulary
    return bound + 1e-4 * float(gradient[torch.isfinite(gradient)].abs().max())


def loss_and_grad(student, teacher, backend, **kw):
    s = student.detach().clone().requires_grad_(True)
    values = trd_fast.distillation_loss(s, teacher, reduction="none", backend=backend, **kw)
    g = torch.Generator(device="cuda").manual_seed(7)
    upstream = torch.rand(values.shape, generator=g, device="cuda").to(values.dtype)  # the same draws for fp64
    (grad,) = torch.autograd.grad((values * upstream).sum(), s)
    return values.detach(), grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch(divergence, dtype):
    banned = banned_mask(2, 33, 4099)  # banned for both: 0 log 0 terms, finite divergences
    student = with_banned(logits(2, 33, 4099, dtype=dtype), banned)
    teacher = with_banned(logits(2, 33, 4101, dtype=dtype, seed=3), banned)
    student[0, 0, 5] = float("-inf")  # banned by the student alone: forward_kl is +inf there
    teacher[0, 1, 6] = float("-inf")  # by the teacher alone: reverse_kl is +inf there
    kw = dict(divergence=divergence, beta=0.3, temperature=0.7)
    ours_v, ours_g = loss_and_grad(student, teacher, "triton", **kw)
    torch_v, torch_g = loss_and_grad(student, teacher, "torch", **kw)
    exact_v, exact_g = loss_and_grad(student.double(), teacher.double(), "torch", **kw)
    assert ours_g.dtype == dtype and ours_v.dtype == torch.float32
    assert_no_worse_than_torch(ours_v, torch_v, exact_v, eps=torch.finfo(torch.float32).eps,
                               atol=value_atol(student, teacher, 0.7))
    assert_no_worse_than_torch(ours_g, torch_g, exact_g, eps=torch.finfo(dtype).eps, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("inplace", [False, True])
def test_large_padded_vocab_strided_rows(divergence, inplace):
    """Qwen-like padded vocabularies (Vs != Vt), sliced `x[:, :-1]` rows, many tiles per row."""
    base = logits(2, 5, 151936)
    teacher = logits(2, 4, 152064, seed=5)
    student = base[:, :-1]
    w = torch.rand(2, 4, device="cuda")
    kw = dict(divergence=divergence, beta=0.3, temperature=0.7)
    s64 = student.detach().double().requires_grad_(True)
    ref = reference.per_position_divergence(s64, teacher.double(), **kw)
    (exact_grad,) = torch.autograd.grad((ref * w.double()).sum(), s64)

    x = base.clone().requires_grad_(True)
    values = trd_fast.distillation_loss(x[:, :-1], teacher, reduction="none", backend="triton",
                                        inplace_backward=inplace, **kw)
    (values * w).sum().backward()
    torch.testing.assert_close(values.double(), ref.detach(), rtol=1e-5, atol=value_atol(student, teacher, 0.7))
    bound = gradient_atol(student, teacher, 0.7, exact_grad)
    excess = (x.grad[:, :-1].double() - exact_grad).abs() - bound
    assert excess.max().item() <= 0, worst(excess, ours=x.grad[:, :-1], exact=exact_grad, bound=bound)
    assert torch.count_nonzero(x.grad[:, -1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_matches_torch(dtype):
    x = with_banned(logits(3, 17, 32003, dtype=dtype), banned_mask(3, 17, 32003))[:, :-1]
    ids = torch.randint(0, 32003, (3, 16), device="cuda")
    ids[0, :3] = -100
    out = []
    for backend in ("triton", "torch"):
        xx = x.detach().clone().requires_grad_(True)
        lp = trd_fast.token_logprobs(xx, ids, temperature=0.7, backend=backend)
        (grad,) = torch.autograd.grad((lp * torch.linspace(0, 1, 16, device="cuda")).sum(), xx)
        out.append((lp, grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out[0][1].double(), out[1][1].double(), rtol=tol, atol=tol)
    assert torch.count_nonzero(out[0][1][0, :3]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("window", [1, 3, 64])
def test_prefix_scan_matches_torch(dtype, window):
    signal = torch.randn(2500, 7, device="cuda").to(dtype).t()  # [7, 2500], strided
    signal[3, 100] = float("nan")
    lengths = torch.tensor([0, 2500, 1, 1999, 1024, 2047, 17], device="cuda")
    c1, f1 = trd_fast.prefix_scan(signal, lengths, threshold=0.25, window=window, backend="triton")
    c2, f2 = trd_fast.prefix_scan(signal.cpu(), lengths.cpu(), threshold=0.25, window=window, backend="torch")
    assert torch.equal(f1.cpu(), f2)
    torch.testing.assert_close(c1.cpu(), c2, rtol=1e-5, atol=1e-4, equal_nan=True)


def _kernel_cases():
    from trd_fast.kernels import divergence, token_logprobs

    return [divergence.divergence_forward_kernel, divergence.divergence_backward_kernel,
            divergence.divergence_backward_inplace_kernel, token_logprobs.token_logprobs_kernel,
            token_logprobs.token_logprobs_backward_kernel]


@pytest.mark.parametrize("index", range(len(STREAM_TILES_GPU)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_autotune_candidate(monkeypatch, index, dtype):
    """Each tile candidate alone gives the torch numbers (no benchmarking with a single config)."""
    config = STREAM_TILES_GPU[index].config("BLOCK_V")
    for kernel in _kernel_cases():
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    banned = banned_mask(3, 4, 20000)
    student = with_banned(logits(3, 4, 20011, dtype=dtype), banned)
    teacher = with_banned(logits(3, 4, 20000, dtype=dtype, seed=2), banned)
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, beta=0.3, temperature=0.7)
        torch_v, torch_g = loss_and_grad(student, teacher, "torch", **kw)  # the same dtype's torch computation
        exact_v, exact_g = loss_and_grad(student.double(), teacher.double(), "torch", **kw)
        for inplace in (False, True):
            ours_v, ours_g = loss_and_grad(student, teacher, "triton", inplace_backward=inplace, **kw)
            # fp32 torch misses fp64 by more than a fixed 1e-5 at V = 20011 (measured on CPU: 5e-5 in the values,
            # 4.5e-5 in reverse_kl's gradient), so each is judged against fp64, no worse than torch's own error
            assert_no_worse_than_torch(ours_v, torch_v, exact_v, eps=torch.finfo(torch.float32).eps,
                                       atol=value_atol(student, teacher, 0.7))
            assert_no_worse_than_torch(ours_g, torch_g, exact_g, eps=torch.finfo(dtype).eps,
                                       atol=gradient_atol(student, teacher, 0.7, exact_g))
            assert torch.count_nonzero(ours_g[..., 20000:]) == 0                 # past the teacher's vocabulary
    ids = torch.randint(0, 20011, (3, 4), device="cuda")
    x = student.detach().clone().requires_grad_(True)
    trd_fast.token_logprobs(x, ids, backend="triton").sum().backward()
    x_ref = student.detach().clone().requires_grad_(True)
    trd_fast.token_logprobs(x_ref, ids, backend="torch").sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=tol, atol=tol)


def _opcheck_cases():
    s = logits(2, 3, 37, dtype=torch.bfloat16).requires_grad_(True)
    t = logits(2, 3, 40, seed=4)
    strided = logits(2, 4, 37)[:, :-1]
    cases = []
    for kind in (0, 1, 2):
        cases.append(("divergence_triton", (s, t, kind, 0.3, 0.7, False)))
        cases.append(("divergence_triton", (strided.requires_grad_(True), t, kind, 0.3, 1.0, False)))
        value, stats = torch.ops.trd_fast.divergence_triton(s.detach(), t, kind, 0.3, 0.7, False)
        grad = torch.rand(2, 3, device="cuda")
        cases.append(("divergence_backward_triton", (grad, s.detach(), t, value, stats, kind, 0.3, 0.7)))
        cases.append(("divergence_backward__triton", (grad, s.detach().clone(), t, value, stats, kind, 0.3, 0.7)))
    x = logits(2, 3, 50).requires_grad_(True)
    ids = torch.randint(0, 50, (2, 3), device="cuda")
    ids[0, 0] = -100
    cases.append(("token_logprobs_triton", (x, ids, 0.7)))
    _, lse = torch.ops.trd_fast.token_logprobs_triton(x.detach(), ids, 0.7)
    cases.append(("token_logprobs_backward_triton", (torch.rand(2, 3, device="cuda"), x.detach(), ids, lse, 0.7)))
    cases.append(("prefix_scan_triton", (torch.randn(3, 20, device="cuda"),
                                         torch.tensor([0, 20, 7], device="cuda"), 0.1, 3)))
    return cases


def test_opcheck_every_op():
    ops()
    for name, args in _opcheck_cases():
        torch.library.opcheck(getattr(torch.ops.trd_fast, name).default, args)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_compile_fullgraph_matches_eager(divergence):
    torch._dynamo.reset()
    student = logits(2, 9, 3001)
    teacher = logits(2, 9, 3001, seed=6)
    weight = torch.rand(2, 9, device="cuda") > 0.3

    def loss_fn(s, t, w):
        return trd_fast.distillation_loss(s, t, divergence=divergence, beta=0.3, temperature=0.7, weight=w,
                                          backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = []
    for fn in (loss_fn, compiled):
        s = student.detach().clone().requires_grad_(True)
        loss = fn(s, teacher, weight)
        (grad,) = torch.autograd.grad(loss * 2.0, s)
        grads.append((loss.detach(), grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)


def test_compile_fullgraph_token_logprobs_and_prefix_scan():
    torch._dynamo.reset()
    x = logits(2, 5, 1000)
    ids = torch.randint(0, 1000, (2, 5), device="cuda")
    ids[1, 1] = -100

    def lp_fn(x):
        return trd_fast.token_logprobs(x, ids, temperature=0.7, backend="triton").sum()

    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    eager = lp_fn(xs[0])
    eager.backward()
    compiled = torch.compile(lp_fn, fullgraph=True)(xs[1])
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)

    signal = torch.randn(4, 33, device="cuda")
    lengths = torch.tensor([33, 0, 5, 20], device="cuda")

    def scan_fn(signal, lengths):
        return trd_fast.prefix_scan(signal, lengths, threshold=0.2, window=3, backend="triton")

    c1, f1 = torch.compile(scan_fn, fullgraph=True)(signal, lengths)
    c2, f2 = scan_fn(signal, lengths)
    assert torch.equal(f1, f2)
    torch.testing.assert_close(c1, c2)


@pytest.mark.parametrize("reduction,weighted", [("none", False), ("sum", False), ("mean", True), ("mean", False)])
def test_no_host_synchronisation(reduction, weighted):
    student = logits(2, 8, 5000)
    teacher = logits(2, 8, 5000, seed=8)
    weight = torch.rand(2, 8, device="cuda") if weighted else None
    ids = torch.randint(0, 5000, (2, 8), device="cuda")
    lengths = torch.tensor([8, 3], device="cuda")

    def step():
        s = student.detach().clone().requires_grad_(True)
        loss = trd_fast.distillation_loss(s, teacher, weight=weight, reduction=reduction, backend="triton")
        loss.sum().backward()
        x = student.detach().clone().requires_grad_(True)
        trd_fast.token_logprobs(x, ids, backend="triton").sum().backward()
        trd_fast.prefix_scan(student[:, :, 0], lengths, threshold=0.0, window=2, backend="triton")

    step()  # autotuning benchmarks (and synchronises) on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_bad_token_id_is_a_device_side_assert():
    """On CUDA the id check is a device-side assert (no host sync); it poisons the context: run apart."""
    code = ("import torch, trd_fast\n"
            "x = torch.randn(2, 3, 10, device='cuda')\n"
            "ids = torch.tensor([[1, 2, 3], [4, 10, -100]], device='cuda')\n"
            "trd_fast.token_logprobs(x, ids, backend='triton')\n"
            "torch.cuda.synchronize()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    assert "assert" in (result.stderr + result.stdout).lower()


def test_fp64_inputs_compute_in_fp64():
    student = logits(2, 3, 777, dtype=torch.float64)
    teacher = logits(2, 3, 777, dtype=torch.float64, seed=9)
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, beta=0.3, temperature=0.7)
        ours_v, ours_g = loss_and_grad(student, teacher, "triton", **kw)
        ref_v, ref_g = loss_and_grad(student, teacher, "torch", **kw)
        torch.testing.assert_close(ours_v, ref_v, rtol=1e-6, atol=1e-6)  # values are fp32 by contract
        assert ours_g.dtype == torch.float64
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-10, atol=1e-12)
    value, stats = torch.ops.trd_fast.divergence_triton(student, teacher, KINDS["forward_kl"], 0.0, 0.7, False)
    assert stats.dtype == torch.float64
    lse = torch.logsumexp(student / 0.7, -1)
    torch.testing.assert_close(stats[..., 0], lse, rtol=1e-13, atol=1e-13)
    assert math.isfinite(value.sum().item())
