"""fused_linear_distillation_loss against the float64 oracle (projection, then trd_fast.reference): every option,
the gradients of the student's hidden states, head and bias, bf16/fp16 relative to torch, memory (no [N, V]
tensor), opcheck and torch.compile over the cpp op, and malformed arguments."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DIVERGENCES, assert_matches, rand, randn, require_backend, sparse_teacher, to64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trd_fast
from trd_fast.ops import fused_linear_blocks

HS, HT, VS, VT = 13, 21, 37, 31  # odd widths; the vocabularies and hidden widths differ
STUDENT = ("student_hidden", "student_weight", "student_bias")
FP32_TOL = dict(rtol=2e-5, atol=2e-6)
FP64_TOL = dict(rtol=1e-10, atol=1e-12)
META = torch.device("meta")
DIVERGENCE_IDS = [d for d, _ in DIVERGENCES]
TINY_BUDGET = 2000  # bytes: blocks of 5 rows (dense) or 2 (gathered) here


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of a few rows, so that every call runs several row blocks and a partial last one."""
    monkeypatch.setitem(fused_linear_blocks.TILE_BUDGET_BYTES, "cpu", TINY_BUDGET)


def heads(lead=(2, 5), *, dtype=torch.float32, bias=True, seed=0):
    """Hidden states and LM heads of both models; logits of standard deviation ~1.5."""
    def weight(v, h, s):
        return randn(v, h, seed=s, scale=1.5 / math.sqrt(h), dtype=dtype)
    return dict(student_hidden=randn(*lead, HS, seed=seed, scale=1.0, dtype=dtype),
                student_weight=weight(VS, HS, seed + 1),
                teacher_hidden=randn(*lead, HT, seed=seed + 2, scale=1.0, dtype=dtype),
                teacher_weight=weight(VT, HT, seed + 3),
                student_bias=randn(VS, seed=seed + 4, scale=0.5, dtype=dtype) if bias else None,
                teacher_bias=randn(VT, seed=seed + 5, scale=0.5, dtype=dtype) if bias else None)


def sparse_heads(lead=(2, 5), k=6, seed=0):
    inputs = heads(lead, seed=seed)
    for name in ("teacher_weight", "teacher_bias"):
        inputs[name] = None
    inputs["teacher_hidden"] = sparse_teacher(lead, k, VS, seed=seed + 7)
    return inputs


def run(inputs, *, backend, grad_output=None, **options):
    """(loss, per_token, {name: gradient}) of the fused loss; backend "oracle" is the torch path in float64."""
    if backend == "oracle":
        inputs = {k: to64(v) for k, v in inputs.items()}
        options = {k: to64(v) for k, v in options.items()}
        backend = "torch"
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if k in STUDENT and v is not None}
    loss, per_token = trd_fast.fused_linear_distillation_loss(**{**inputs, **leaves}, backend=backend,
                                                              return_per_token=True, **options)
    upstream = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(upstream)
    return loss.detach(), per_token, {k: v.grad for k, v in leaves.items()}


def check(inputs, *, backend, grad_output=None, tol=FP32_TOL, **options):
    loss, per_token, grads = run(inputs, backend=backend, grad_output=grad_output, **options)
    ref_loss, ref_per_token, ref_grads = run(inputs, backend="oracle", grad_output=grad_output, **options)
    assert loss.dtype == torch.float32 and per_token.dtype == torch.float32 and not per_token.requires_grad
    assert per_token.shape == inputs["student_hidden"].shape[:-1]
    assert_matches(per_token, ref_per_token, **tol)
    assert_matches(loss, ref_loss, **tol)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        assert_matches(grad, ref_grads[name], **tol)
    return loss, per_token, grads


def upstream(lead, seed=9):
    return randn(*lead, seed=seed, scale=1.0)


CASES = {
    "plain": lambda: (heads(), {}),
    "options": lambda: (heads(), dict(temperature=0.7, clip=0.6, weight=rand(2, 5, seed=3) * (rand(2, 5) > 0.3),
                                      normalizer=3.0)),
    "sum-scaled": lambda: (heads(), dict(reduction="sum", grad_output=torch.tensor(2.5))),
    "none-upstream": lambda: (heads(), dict(reduction="none", weight=rand(2, 5, seed=4), grad_output=upstream((2, 5)))),
    "top_k": lambda: (heads(), dict(top_k=5, temperature=1.3, reduction="none", grad_output=upstream((2, 5)))),
    "top_k-all": lambda: (heads(), dict(top_k=100, weight=rand(2, 5, seed=5) > 0.4)),
    "sparse": lambda: (sparse_heads(), dict(clip=0.8)),
    "sparse-none": lambda: (sparse_heads(), dict(reduction="none", grad_output=upstream((2, 5)))),
    "softcap-scale": lambda: (heads(), dict(student_softcap=2.5, teacher_softcap=3.0, student_logit_scale=1.3,
                                            teacher_logit_scale=0.8, reduction="none", grad_output=upstream((2, 5)))),
    "softcap-top_k": lambda: (heads(), dict(student_softcap=2.0, student_logit_scale=-0.7, top_k=4)),
    "softcap-sparse": lambda: (sparse_heads(), dict(student_softcap=2.0, reduction="sum")),
    "no-bias": lambda: (heads(bias=False), dict(temperature=2.0)),
    "lead-1d": lambda: (heads(()), {}),
    "lead-3d": lambda: (heads((2, 2, 3)), dict(reduction="none", grad_output=upstream((2, 2, 3)))),
}


TRITON_CASES = ("plain", "none-upstream", "top_k", "sparse-none", "softcap-scale")  # the interpreter is slow
BACKEND_CASES = [(b, c) for b in BACKENDS for c in CASES if b != "triton" or c in TRITON_CASES]


@pytest.mark.parametrize("backend_name,case", BACKEND_CASES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_matches_float64_oracle(backend_name, case, divergence, beta):
    backend = require_backend(backend_name)
    inputs, options = CASES[case]()
    check(inputs, backend=backend, divergence=divergence, beta=beta, **options)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_banned_tokens(backend, divergence, beta):
    """A -inf student bias (banned tokens): forward KL is +inf there (clipped here), never NaN; zero gradient."""
    inputs = heads()
    inputs["student_bias"][:4] = float("-inf")
    loss, per_token, grads = check(inputs, backend=backend, divergence=divergence, beta=beta, clip=2.0)
    assert torch.isinf(per_token).all() == (divergence == "forward_kl")
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["N=0", "2x0"])
def test_empty_batch(backend, lead):
    loss, per_token, grads = check(heads(lead), backend=backend)
    assert float(loss) == 0 and per_token.shape == lead
    assert all(not g.any() for g in grads.values())


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_all_masked_is_exactly_zero(backend, divergence, beta):
    cases = (dict(weight=torch.zeros(2, 5)), dict(normalizer=0.0), dict(clip=0.0, reduction="sum"))
    for options in cases[:1] if backend == "triton" else cases:
        loss, _, grads = run(heads(), backend=backend, divergence=divergence, beta=beta, **options)
        assert float(loss) == 0.0
        assert all(not g.any() for g in grads.values()), options


@pytest.mark.parametrize("backend_name,divergence,beta", [("cpp", d, b) for d, b in DIVERGENCES] + [("triton", "jsd", 0.3)])
def test_float64_inputs_are_tight(backend_name, divergence, beta):
    backend = require_backend(backend_name)
    inputs = {k: to64(v) for k, v in heads().items()}
    check(inputs, backend=backend, tol=FP64_TOL, divergence=divergence, beta=beta, temperature=0.8,
          reduction="none", grad_output=upstream((2, 5)))
    check({k: to64(v) for k, v in sparse_heads().items()}, backend=backend, tol=FP64_TOL, divergence=divergence,
          beta=beta)


def test_default_tile_budget(monkeypatch):
    """The shipped budget (one block here) gives the same numbers."""
    monkeypatch.setitem(fused_linear_blocks.TILE_BUDGET_BYTES, "cpu", fused_linear_blocks.DEFAULT_TILE_BUDGET)
    check(heads(), backend=require_backend("cpp"), divergence="jsd", beta=0.3, top_k=9)
    check(heads(), backend="cpp", divergence="reverse_kl", reduction="none", grad_output=upstream((2, 5)))


def test_teacher_gets_no_gradient(backend):
    inputs = heads()
    teacher = {k: inputs[k].clone().requires_grad_() for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    hidden = inputs["student_hidden"].clone().requires_grad_()
    trd_fast.fused_linear_distillation_loss(**{**inputs, **teacher, "student_hidden": hidden},
                                            backend=backend).backward()
    assert hidden.grad is not None and all(t.grad is None for t in teacher.values())


def test_module_matches_function():
    inputs = heads()
    module = trd_fast.FusedLinearDistillationLoss(divergence="jsd", beta=0.2, temperature=0.9, top_k=7,
                                                  student_softcap=4.0, teacher_logit_scale=0.5, backend="cpp")
    weight = rand(2, 5, seed=1)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                 inputs["teacher_weight"], weight=weight, student_bias=inputs["student_bias"],
                 teacher_bias=inputs["teacher_bias"])
    expected = trd_fast.fused_linear_distillation_loss(**inputs, divergence="jsd", beta=0.2, temperature=0.9,
                                                       top_k=7, student_softcap=4.0, teacher_logit_scale=0.5,
                                                       weight=weight, backend="cpp")
    assert torch.equal(got, expected)
    assert "student_softcap=4.0" in repr(module)
    with pytest.raises(ValueError, match="student_softcap"):
        trd_fast.FusedLinearDistillationLoss(student_softcap=0.0)


# ---------------------------------------------------------------------------------------------- precision

def same_dtype_torch(inputs, divergence, beta):
    """The plain torch computation in the inputs' own dtype: logits, log_softmax, KL, autograd."""
    leaves = {k: inputs[k].clone().requires_grad_() for k in STUDENT}
    student = leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"]
    teacher = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    width = min(student.shape[-1], teacher.shape[-1])
    log_p, log_q = F.log_softmax(student[..., :width], -1), F.log_softmax(teacher[..., :width], -1)
    if divergence == "forward_kl":
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), dim=0)
        per_token = (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
                     + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1))
    loss = per_token.mean()
    loss.backward()
    return loss.detach(), per_token.detach(), {k: v.grad for k, v in leaves.items()}


def assert_no_worse_than_torch(ours, same_dtype, exact, *, tol):
    """|ours - exact| <= 2 |torch in the same dtype - exact| + tol, elementwise."""
    ours_error = (ours.double() - exact).abs()
    bound = 2 * (same_dtype.double() - exact).abs() + tol
    assert (ours_error <= bound).all(), f"error {float((ours_error - bound).max()):.3g} over the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_half_precision_relative_to_torch(dtype, divergence, beta):
    inputs = heads((4, 6), dtype=dtype)
    ours = run(inputs, backend=require_backend("cpp"), divergence=divergence, beta=beta)
    exact = run(inputs, backend="oracle", divergence=divergence, beta=beta)
    torch_result = same_dtype_torch(inputs, divergence, beta)
    for i in (0, 1):
        assert_no_worse_than_torch(ours[i], torch_result[i], exact[i], tol=1e-5 * exact[i].abs() + 1e-6)
    for name in STUDENT:
        assert ours[2][name].dtype == dtype
        assert_no_worse_than_torch(ours[2][name], torch_result[2][name], exact[2][name],
                                   tol=torch.finfo(dtype).eps * exact[2][name].abs() + 1e-7)


# ---------------------------------------------------------------------------------------------- memory

def largest_allocation(fn) -> int:
    """Bytes of the largest single tensor allocation while fn() runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if not e.cpu_children), default=0)


@pytest.mark.parametrize("options", [dict(student_softcap=3.0), dict(reduction="none"), dict(top_k=8, divergence="jsd")],
                         ids=["mean-softcap", "none", "top_k"])
def test_no_n_by_v_allocation(monkeypatch, options):
    """Forward and backward on N = 512 rows allocate nothing of [N, V] size: at most a tile of R rows, the
    head's gradient [V, H] or the hidden states' [N, H]. The torch backend, which forms the logits, does."""
    n, vocab, width = 512, 600, 8
    monkeypatch.setitem(fused_linear_blocks.TILE_BUDGET_BYTES, "cpu", 64 * 1024)  # R = 13 rows of both tiles
    hidden, head = randn(n, width).requires_grad_(), randn(vocab, width, seed=1, scale=0.3).requires_grad_()
    teacher, teacher_head = randn(n, width, seed=2), randn(vocab, width, seed=3, scale=0.3)

    def step(backend):
        def fn():
            loss = trd_fast.fused_linear_distillation_loss(hidden, head, teacher, teacher_head, backend=backend,
                                                           **options)
            loss.backward(torch.ones_like(loss))
        return fn
    bound = max(64 * 1024, vocab * width * 4, n * width * 4)
    assert largest_allocation(step("cpp")) <= bound
    assert largest_allocation(step("torch")) >= n * vocab * 4 > 4 * bound


def test_scalar_loss_backward_allocates_no_head_sized_tensor():
    """With a scalar loss the gradients come from the forward: the backward scales them in place (fp32) and
    allocates nothing of the head's size [V, H] (not even autograd's zero gradients for the op's other outputs)."""
    inputs = heads((4, 5))
    leaves = {k: inputs[k].clone().requires_grad_() for k in STUDENT}
    loss = trd_fast.fused_linear_distillation_loss(**{**inputs, **leaves}, backend=require_backend("cpp"))
    assert largest_allocation(loss.backward) < VS * HS * 4
    assert all(leaves[k].grad is not None for k in STUDENT)


# ---------------------------------------------------------------------------------------------- torch.library

def op_arguments(inputs, top_k=None, kind=0, beta=0.0):
    sparse = isinstance(inputs["teacher_hidden"], trd_fast.SparseTeacher)
    teacher = inputs["teacher_hidden"]
    head = ((None, None, None, teacher.ids.reshape(-1, teacher.shape[-1]), teacher.logprobs.reshape(-1, teacher.shape[-1]))
            if sparse else (teacher.reshape(-1, HT), inputs["teacher_weight"], inputs["teacher_bias"], None, None))
    return (inputs["student_hidden"].reshape(-1, HS).requires_grad_(), inputs["student_weight"].requires_grad_(),
            inputs["student_bias"].requires_grad_(), *head, 1.2, 0.9, 3.0, None, kind, beta, 0.8, top_k, "cpp")


@pytest.mark.parametrize("variant", ["dense", "top_k", "sparse"])
def test_opcheck(variant):
    require_backend("cpp")
    inputs = sparse_heads() if variant == "sparse" else heads()
    args = op_arguments(inputs, top_k=5 if variant == "top_k" else None, kind=2, beta=0.3)
    ops = torch.ops.trd_fast
    weight, normalizer = rand(10, seed=2), torch.tensor(4.0)
    torch.library.opcheck(ops.fused_linear_loss.default, (*args, weight, normalizer, 0.5, "mean", [True] * 3))
    torch.library.opcheck(ops.fused_linear_values.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    saved = ops.fused_linear_values(*detached)
    torch.library.opcheck(ops.fused_linear_values_backward.default,
                          (upstream((10,)), *saved, *detached, [True, True, True]))


@pytest.mark.parametrize("options", [dict(divergence="reverse_kl", temperature=0.8, clip=3.0, top_k=6),
                                     dict(divergence="jsd", beta=0.3, reduction="none", student_softcap=3.0),
                                     dict(sparse=True, reduction="sum")],
                         ids=["reverse_kl-top_k", "jsd-none-softcap", "sparse"])
def test_compile_fullgraph(options):
    require_backend("cpp")
    torch._dynamo.reset()
    options = dict(options)
    inputs = sparse_heads() if options.pop("sparse", False) else heads()
    weight = rand(2, 5, seed=2) > 0.2

    def fn(**leaves):
        loss, per_token = trd_fast.fused_linear_distillation_loss(**{**inputs, **leaves}, weight=weight,
                                                                  return_per_token=True, backend="cpp", **options)
        return loss.sum(), per_token

    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        leaves = {k: inputs[k].clone().requires_grad_() for k in STUDENT}
        loss, per_token = f(**leaves)
        (2 * loss).backward()
        results.append((loss.detach(), per_token, *(leaves[k].grad for k in STUDENT)))
    for got, expected in zip(*results):
        assert_matches(got, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- bad arguments

def call(**changes):
    inputs = {**heads(), **changes}
    return lambda: trd_fast.fused_linear_distillation_loss(**inputs)


ERRORS = {
    "student_hidden": [dict(student_hidden=torch.zeros(2, 5, HS, dtype=torch.int64)), dict(student_hidden=3.0),
                       dict(student_hidden=torch.zeros(2, 5, 0)), dict(student_hidden=torch.tensor(1.0))],
    "student_weight": [dict(student_weight=randn(VS, HS + 1)), dict(student_weight=randn(VS)),
                       dict(student_weight=None), dict(student_weight=torch.zeros(0, HS)),
                       dict(student_weight=torch.zeros(VS, HS, device=META))],
    "student_bias": [dict(student_bias=randn(VS + 1)), dict(student_bias=torch.zeros(VS, dtype=torch.int32))],
    "teacher_hidden": [dict(teacher_hidden=randn(5, 2, HT)), dict(teacher_hidden=None),
                       dict(teacher_hidden=torch.zeros(2, 5, HT, device=META))],
    "teacher_weight": [dict(teacher_weight=randn(VT, HS)), dict(teacher_weight=None)],
    "teacher_bias": [dict(teacher_bias=randn(VS))],
    "student_softcap": [dict(student_softcap=0.0), dict(student_softcap=-1.0), dict(student_softcap=float("inf")),
                        dict(student_softcap="2")],
    "teacher_softcap": [dict(teacher_softcap=float("nan"))],
    "student_logit_scale": [dict(student_logit_scale=float("inf")), dict(student_logit_scale=None)],
    "teacher_logit_scale": [dict(teacher_logit_scale=float("nan"))],
    "divergence": [dict(divergence="kl")],
    "top_k": [dict(top_k=0)],
    "weight": [dict(weight=torch.ones(5, 2))],
    "normalizer": [dict(normalizer=1.0, reduction="sum")],
    "return_per_token": [dict(return_per_token=1)],
    "backend": [dict(backend="cuda")],
}


@pytest.mark.parametrize("name,changes", [(n, c) for n, cases in ERRORS.items() for c in cases])
def test_bad_argument_raises_value_error(backend, name, changes):
    with pytest.raises(ValueError, match=re.escape(name)):
        call(**{"backend": backend, **changes})()


@pytest.mark.parametrize("name,changes", [
    ("teacher_weight", dict(teacher_weight=randn(VT, HT))), ("teacher_bias", dict(teacher_bias=randn(VT))),
    ("teacher_softcap", dict(teacher_softcap=2.0)), ("teacher_logit_scale", dict(teacher_logit_scale=2.0)),
    ("top_k", dict(top_k=3)), ("teacher_hidden", dict(ids=torch.full((2, 5, 3), VS))),
    ("teacher_hidden", dict(ids=torch.zeros(2, 5, 0, dtype=torch.int64))),
    ("teacher_hidden", dict(ids=torch.zeros(5, 2, 3, dtype=torch.int64)))])
def test_bad_sparse_teacher_arguments(name, changes):
    inputs = sparse_heads()
    ids = changes.pop("ids", None)
    if ids is not None:
        inputs["teacher_hidden"] = trd_fast.SparseTeacher(ids, torch.zeros(ids.shape))
    with pytest.raises(ValueError, match=re.escape(name)):
        trd_fast.fused_linear_distillation_loss(**{**inputs, **changes}, backend="cpp")


BAD_TENSORS = [torch.zeros(2, 5, 3, dtype=torch.int64), torch.zeros(2, 5, 3, dtype=torch.bool), torch.tensor(0.5),
               torch.zeros(2, 5, 0), torch.zeros(3, 4), torch.zeros(7), torch.zeros(2, 5, 3, dtype=torch.complex64),
               None, 3.0, "x", [[0.0] * 3]]  # none fits any head argument here (H = 3 or 4 fits no head)
TENSOR_NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                "teacher_bias")


@st.composite
def malformed(draw):
    """One argument of a valid call replaced by something malformed, and its name (the message must hold it)."""
    name = draw(st.sampled_from(TENSOR_NAMES + ("student_logit_scale", "teacher_logit_scale", "student_softcap",
                                                "teacher_softcap")))
    if name.endswith("scale"):
        return name, draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), "1", None, [1.0], 1j]))
    if name.endswith("softcap"):
        return name, draw(st.one_of(st.sampled_from([float("nan"), float("inf"), "1", [1.0], 1j]),
                                    st.floats(max_value=0.0)))
    bad = [t for t in BAD_TENSORS if t is not None or not name.endswith("bias")]  # a bias may be None
    return name, draw(st.one_of(st.sampled_from(bad), st.integers()))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed(), lead=st.sampled_from([(2, 5), (0,), ()]))
def test_malformed_arguments_raise_value_error(case, lead):
    name, value = case
    with pytest.raises(ValueError, match=re.escape(name)):
        trd_fast.fused_linear_distillation_loss(**{**heads(lead), name: value}, backend=require_backend("cpp"))
