"""distillation_loss and DistillationLoss on every backend against the float64 reference."""

import pytest
import torch
from conftest import (DIVERGENCES, FP32, assert_matches, check_against_oracle, evaluate, rand, randn,
                      sparse_teacher)

import trd_fast

# name: (student base shape, teacher shape, student view, teacher view)
SHAPES = {
    "2d": ((6, 37), (6, 37), None, None),
    "3d": ((2, 3, 50), (2, 3, 50), None, None),
    "4d": ((2, 2, 2, 19), (2, 2, 2, 19), None, None),
    "V=1": ((5, 1), (5, 1), None, None),
    "N=0": ((0, 16), (0, 16), None, None),
    "N=0-3d": ((2, 0, 8), (2, 0, 8), None, None),
    "Vs>Vt": ((4, 40), (4, 33), None, None),
    "Vs<Vt": ((4, 33), (4, 40), None, None),
    "sliced": ((2, 6, 29), (2, 5, 29), lambda s: s[:, :-1], None),
    "sliced-teacher": ((2, 5, 29), (2, 6, 29), None, lambda t: t[:, 1:]),
    "vocab-slice": ((4, 40), (4, 31), lambda s: s[:, :31], None),
    "transposed": ((29, 6), (6, 29), lambda s: s.t(), None),
}


def make_case(shape_name, seed=0):
    student_shape, teacher_shape, view, teacher_view = SHAPES[shape_name]
    student = randn(*student_shape, seed=seed)
    teacher = randn(*teacher_shape, seed=seed + 1)
    if teacher_view is not None:
        teacher = teacher_view(teacher)
    return student, teacher, view


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_and_divergences(backend, shape, divergence, beta):
    student, teacher, view = make_case(shape)
    lead = (view(student) if view else student).shape[:-1]
    grad_output = randn(*lead, seed=7, scale=1.0)  # a random upstream gradient per position
    check_against_oracle(student, teacher, backend=backend, view=view, divergence=divergence, beta=beta,
                         reduction="none", grad_output=grad_output)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_vocab_beyond_common_width_gets_zero_gradient(backend, divergence, beta):
    student, teacher = randn(4, 40), randn(4, 33, seed=1)
    _, _, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta)
    assert torch.equal(grad[:, 33:], torch.zeros(4, 7))
    assert grad[:, :33].abs().sum() > 0


OPTIONS = {
    "T=0.7": dict(temperature=0.7),
    "T=2.5,top_k=5": dict(temperature=2.5, top_k=5),
    "top_k=1": dict(top_k=1),
    "top_k=5": dict(top_k=5),
    "top_k>V": dict(top_k=1000),
    "clip=median": dict(clip="median"),
    "clip=0": dict(clip=0.0),
    "bool-weight": dict(weight="bool"),
    "float-weight-sum": dict(weight="float", reduction="sum"),
    "float-weight-none": dict(weight="float", reduction="none"),
    "normalizer-float": dict(weight="float", normalizer=7.5),
    "normalizer-tensor": dict(normalizer=torch.tensor(3.0)),
    "sum": dict(reduction="sum"),
    "everything": dict(temperature=1.5, top_k=6, clip="median", weight="float", normalizer=torch.tensor(4.25)),
}


def resolve_options(options, student, teacher, divergence, beta):
    """Fill in data-dependent options: weights, and a clip at the median per-token value (half clipped)."""
    options = dict(options)
    lead = student.shape[:-1]
    if options.get("weight") == "bool":
        options["weight"] = rand(*lead, seed=3) < 0.6
    elif options.get("weight") == "float":
        options["weight"] = rand(*lead, seed=3) * 2
    if options.get("clip") == "median":
        probe = {k: v for k, v in options.items() if k in ("temperature", "top_k")}
        _, values, _ = evaluate(student, teacher, backend="oracle", divergence=divergence, beta=beta, **probe)
        options["clip"] = split_clip(values)
    return options


def split_clip(values):
    """A clip halfway between two middle per-token values: about half the positions are clipped, and no value
    sits near the clip (where fp32 and fp64 could disagree about l > clip)."""
    ordered = values.flatten().sort().values
    middle = ordered.numel() // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(backend, option, divergence, beta):
    student, teacher = randn(3, 4, 23), randn(3, 4, 23, seed=1)
    options = resolve_options(OPTIONS[option], student, teacher, divergence, beta)
    grad_output = randn(3, 4, seed=5, scale=1.0) if options.get("reduction") == "none" else None
    check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta,
                         grad_output=grad_output, **options)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_clip_zeroes_gradient_above_clip(backend, divergence, beta):
    student, teacher = randn(8, 19), randn(8, 19, seed=1)
    _, values, _ = evaluate(student, teacher, backend="oracle", divergence=divergence, beta=beta)
    clip = split_clip(values)
    above = values > clip
    assert 0 < int(above.sum()) < 8
    loss, per_token, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence,
                                                 beta=beta, clip=clip, reduction="sum")
    assert torch.equal(grad[above], torch.zeros_like(grad[above]))
    assert (grad[~above].abs().sum(-1) > 0).all()
    # per_token is the raw l, unclipped; the loss counts clip for each clipped position
    assert_matches(per_token, values, **FP32)
    assert_matches(loss, torch.where(above, torch.full_like(values, clip), values).sum(), **FP32)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_jsd_beta_0_and_1_are_forward_and_reverse_kl(backend, temperature):
    student, teacher = randn(6, 37), randn(6, 37, seed=1)
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = evaluate(student, teacher, backend=backend, divergence="jsd", beta=beta, temperature=temperature)
        kl = evaluate(student, teacher, backend=backend, divergence=same, temperature=temperature)
        for a, b in zip(jsd, kl):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        check_against_oracle(student, teacher, backend=backend, divergence="jsd", beta=beta,
                             temperature=temperature)


def test_per_token_is_raw_detached_fp32(backend):
    student = randn(4, 5, 17).requires_grad_()
    teacher, weight = randn(4, 5, 17, seed=1), rand(4, 5, seed=2)
    loss, per_token = trd_fast.distillation_loss(student, teacher, weight=weight, clip=0.3, reduction="none",
                                                 return_per_token=True, backend=backend)
    raw = trd_fast.distillation_loss(student, teacher, reduction="none", backend=backend)
    assert per_token.dtype == torch.float32 and per_token.shape == (4, 5)
    assert not per_token.requires_grad and per_token.grad_fn is None
    assert_matches(per_token, raw.detach(), rtol=0, atol=0)
    assert_matches(loss.detach(), weight * per_token.clamp(max=0.3), **FP32)


def test_loss_scaled_by_two(backend):
    student, teacher = randn(5, 21), randn(5, 21, seed=1)
    s = student.clone().requires_grad_()
    (2.0 * trd_fast.distillation_loss(s, teacher, divergence="reverse_kl", backend=backend)).backward()
    _, _, ref_grad = evaluate(student, teacher, backend="oracle", divergence="reverse_kl")
    assert_matches(s.grad, 2.0 * ref_grad, **FP32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight_dtype", [torch.bool, torch.float32])
def test_all_masked_is_exactly_zero(backend, reduction, weight_dtype):
    student, teacher = randn(3, 4, 29), randn(3, 4, 29, seed=1)
    weight = torch.zeros(3, 4, dtype=weight_dtype)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        s = student.clone().requires_grad_()
        loss = trd_fast.distillation_loss(s, teacher, divergence=divergence, weight=weight, reduction=reduction,
                                          backend=backend)
        loss.sum().backward()
        assert torch.equal(loss.detach(), torch.zeros_like(loss))
        assert torch.equal(s.grad, torch.zeros_like(student))


@pytest.mark.parametrize("normalizer", [0.0, 0, torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)],
                         ids=["float", "int", "tensor", "tensor64"])
def test_zero_normalizer(backend, normalizer):
    student, teacher = randn(6, 13), randn(6, 13, seed=1)
    s = student.clone().requires_grad_()
    loss = trd_fast.distillation_loss(s, teacher, weight=rand(6, seed=2), normalizer=normalizer, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.equal(loss.detach(), torch.zeros(()))
    assert torch.equal(s.grad, torch.zeros_like(student))


def test_normalizer_divides_weighted_sum(backend):
    student, teacher, weight = randn(6, 13), randn(6, 13, seed=1), rand(6, seed=2)
    total = trd_fast.distillation_loss(student, teacher, weight=weight, reduction="sum", backend=backend)
    mean = trd_fast.distillation_loss(student, teacher, weight=weight, normalizer=torch.tensor(2.5), backend=backend)
    default = trd_fast.distillation_loss(student, teacher, weight=weight, backend=backend)
    assert_matches(mean, total / 2.5, **FP32)
    assert_matches(default, total / weight.sum(), **FP32)


# ---------------------------------------------------------------------------------------------- SparseTeacher

@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_sparse_teacher(backend, divergence, beta, temperature):
    student = randn(2, 3, 41)
    teacher = sparse_teacher((2, 3), 7, 41, seed=4)
    assert (teacher.ids == -1).any()
    grad_output = randn(2, 3, seed=6, scale=1.0)
    _, _, grad = check_against_oracle(student, teacher, backend=backend, divergence=divergence, beta=beta,
                                      temperature=temperature, reduction="none", grad_output=grad_output)
    # the gradient flows to the teacher's ids only
    hits = torch.zeros(2, 3, 41, dtype=torch.int64).scatter_add_(-1, teacher.ids.clamp(min=0),
                                                                 (teacher.ids >= 0).long())
    support = hits > 0
    assert torch.equal(grad[~support], torch.zeros_like(grad[~support]))


def test_sparse_teacher_3d_leading_and_n0(backend):
    check_against_oracle(randn(2, 2, 2, 11), sparse_teacher((2, 2, 2), 4, 11, seed=2), backend=backend,
                         divergence="reverse_kl")
    check_against_oracle(randn(0, 11), sparse_teacher((0,), 4, 11), backend=backend)


@pytest.mark.parametrize("temperature", [1.0, 1.8])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)],
                         ids=["forward_kl", "reverse_kl", "jsd", "jsd0", "jsd1"])
def test_sparse_teacher_equals_dense_top_k(backend, divergence, beta, temperature):
    student, teacher_logits = randn(6, 37), randn(6, 37, seed=1)
    logprobs, ids = torch.log_softmax(teacher_logits, dim=-1).topk(5, dim=-1)
    sparse = trd_fast.SparseTeacher(ids, logprobs)
    kwargs = dict(backend=backend, divergence=divergence, beta=beta, temperature=temperature,
                  reduction="none", grad_output=randn(6, seed=3, scale=1.0))
    dense = evaluate(student, teacher_logits, top_k=5, **kwargs)
    for a, b in zip(evaluate(student, sparse, **kwargs), dense):
        assert_matches(a, b, **FP32)


# ---------------------------------------------------------------------------------------------- inplace_backward

@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("options", [{}, dict(top_k=4, temperature=0.8), dict(clip=0.5, weight="float")],
                         ids=["dense", "top_k", "clip+weight"])
def test_inplace_backward_same_gradient(backend, divergence, beta, options):
    student, teacher = randn(3, 4, 23), randn(3, 4, 23, seed=1)
    options = resolve_options(options, student, teacher, divergence, beta)
    expected = evaluate(student, teacher, backend=backend, divergence=divergence, beta=beta, **options)
    got = evaluate(student, teacher, backend=backend, divergence=divergence, beta=beta, inplace_backward=True,
                   **options)
    for a, b in zip(got, expected):
        assert_matches(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_inplace_backward_overwrites_student(kernel_backend, divergence, beta):
    """The gradient is written over the student logits' own storage: no new [N, V] buffer."""
    student, teacher = randn(3, 4, 23), randn(3, 4, 23, seed=1)
    _, _, expected = evaluate(student, teacher, backend=kernel_backend, divergence=divergence, beta=beta,
                              reduction="sum")
    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, like a model's output; MulBackward keeps no reference to it
    loss = trd_fast.distillation_loss(logits, teacher, divergence=divergence, beta=beta, reduction="sum",
                                      inplace_backward=True, backend=kernel_backend)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr()
    assert_matches(logits.detach(), expected, rtol=1e-6, atol=1e-8)
    assert_matches(grad, expected, rtol=1e-6, atol=1e-8)


def test_inplace_backward_on_sliced_logits(kernel_backend):
    """logits[:, :-1] in place: the gradient lands in those rows; the last position is left untouched."""
    base = randn(2, 6, 29)
    teacher = randn(2, 5, 29, seed=1)
    _, _, expected = evaluate(base, teacher, backend="oracle", view=lambda s: s[:, :-1], reduction="sum")
    full = base.clone()
    sliced = full[:, :-1]
    sliced.requires_grad_()
    loss = trd_fast.distillation_loss(sliced, teacher, reduction="sum", inplace_backward=True,
                                      backend=kernel_backend)
    (grad,) = torch.autograd.grad(loss, sliced)
    assert_matches(grad, expected[:, :-1], **FP32)
    assert_matches(full[:, :-1], expected[:, :-1], **FP32)
    assert torch.equal(full[:, -1], base[:, -1])


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_backward_leaves_inputs_untouched(backend, divergence, beta):
    """Without inplace_backward nothing is written over the logits, and the teacher gets no gradient."""
    student, teacher = randn(3, 4, 23), randn(3, 4, 23, seed=1)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    trd_fast.distillation_loss(s, t, divergence=divergence, beta=beta, backend=backend).backward()
    assert torch.equal(s.detach(), student) and torch.equal(t.detach(), teacher)
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_and_normalizer_get_no_gradient(backend, reduction):
    """weight is data (a mask, trajectory weights): no gradient flows to it, nor through the default
    normalizer sum(weight), even when the caller's weight tensor requires grad."""
    student, teacher = randn(3, 4, 23), randn(3, 4, 23, seed=1)
    weight = rand(3, 4, seed=2).requires_grad_()
    s = student.clone().requires_grad_()
    loss = trd_fast.distillation_loss(s, teacher, weight=weight, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert weight.grad is None
    _, _, expected = evaluate(student, teacher, backend="oracle", weight=weight.detach(), reduction=reduction,
                              grad_output=torch.ones(3, 4) if reduction == "none" else None)
    assert_matches(s.grad, expected, **FP32)


# ---------------------------------------------------------------------------------------------- module

@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_module_matches_function(backend, divergence, beta):
    student, teacher, weight = randn(3, 4, 23), randn(3, 4, 23, seed=1), rand(3, 4, seed=2) > 0.3
    options = dict(divergence=divergence, beta=beta, temperature=1.3, top_k=9, clip=2.0, reduction="mean")
    module = trd_fast.DistillationLoss(**options, return_per_token=True, backend=backend)
    s = student.clone().requires_grad_()
    loss, per_token = module(s, teacher, weight=weight, normalizer=torch.tensor(5.0))
    loss.backward()
    check = check_against_oracle(student, teacher, backend=backend, weight=weight, normalizer=torch.tensor(5.0),
                                 **options)
    for a, b in zip((loss.detach(), per_token, s.grad), check):
        assert_matches(a, b, rtol=0, atol=0)
    assert divergence in repr(module)


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="divergence"):
        trd_fast.DistillationLoss(divergence="kl")
    with pytest.raises(ValueError, match="top_k"):
        trd_fast.DistillationLoss(top_k=0)
