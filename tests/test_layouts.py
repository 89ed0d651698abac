"""Leading layouts and the in-place gradient, on every backend.

Any leading shape and strides the torch backend accepts work on every backend and every op, each input with
its own layout, read in place unless rows with two leading strides cannot express it. Misuse of
inplace_backward (logits that another node needs in its backward) raises autograd's error on the kernel
backends instead of returning a wrong gradient, and the LM-head use it is meant for still works in place.
"""

import pytest
import torch
from conftest import FP32, assert_matches, check_against_oracle, evaluate, randn

import trd_fast
from trd_fast import constants, reference
from trd_fast.ops.rows import as_rows

IGNORE = constants.IGNORE_INDEX
VOCAB_STUDENT, VOCAB_TEACHER = 11, 13  # a padded teacher vocabulary: only the common columns count

# Leading shapes of 1-D to 5-D inputs.
LEADS = {1: (), 2: (3,), 3: (2, 3), 4: (2, 3, 2), 5: (2, 2, 2, 2)}


# A layout: (how many leading dims it needs, base shape from (lead, V), view of the base -> [*lead, V]).
def _reversed_dims(x):
    lead = x.dim() - 1
    return x.permute(*reversed(range(lead)), lead)


LAYOUTS = {
    "contiguous": (0, lambda lead, v: (*lead, v), lambda x: x),
    "vocab-slice": (0, lambda lead, v: (*lead, v + 3), lambda x: x[..., :x.shape[-1] - 3]),
    "outer-step": (1, lambda lead, v: (2 * lead[0], *lead[1:], v), lambda x: x[::2]),
    "inner-slice": (2, lambda lead, v: (*lead[:-1], 2 * lead[-1], v), lambda x: x[..., :x.shape[-2] // 2, :]),
    "reversed-dims": (2, lambda lead, v: (*reversed(lead), v), _reversed_dims),
    "expanded": (1, lambda lead, v: (1, *lead[1:], v), None),  # teacher only: one row broadcast over dim 0
}
STUDENT_LAYOUTS = [name for name in LAYOUTS if name != "expanded"]


def make(layout: str, lead: tuple, vocab: int, seed: int):
    """(base tensor, view of it with shape [*lead, vocab]) in `layout`."""
    _, base_shape, view = LAYOUTS[layout]
    base = randn(*base_shape(lead, vocab), seed=seed)
    if layout == "expanded":
        return base, lambda x: x.expand(*lead, vocab)
    return base, view


def fits(layout: str, dims: int) -> bool:
    return LAYOUTS[layout][0] <= len(LEADS[dims])


def pairs(student_layouts, teacher_layouts, dims_list=tuple(LEADS)):
    """(dims, student layout, teacher layout) for every pair that fits the leading dims."""
    return [pytest.param(dims, s, t, id=f"{dims}d-{s}-{t}") for dims in dims_list for s in student_layouts
            for t in teacher_layouts if fits(s, dims) and fits(t, dims)]


def layout_matrix():
    """Every pair of layouts on 4-D inputs; on 1-D to 5-D, each layout once per side, against another one."""
    cases = pairs(STUDENT_LAYOUTS, list(LAYOUTS), dims_list=(4,))
    for dims in (1, 2, 3, 5):
        student_layouts = [name for name in STUDENT_LAYOUTS if fits(name, dims)]
        teacher_layouts = [name for name in LAYOUTS if fits(name, dims)]
        for i, s in enumerate(student_layouts):
            t = teacher_layouts[(i + 1) % len(teacher_layouts)]
            cases.append(pytest.param(dims, s, t, id=f"{dims}d-{s}-{t}"))
        if len(teacher_layouts) > len(student_layouts):  # the teacher-only layouts too
            for t in teacher_layouts[len(student_layouts):]:
                cases.append(pytest.param(dims, student_layouts[-1], t, id=f"{dims}d-{student_layouts[-1]}-{t}"))
    return cases


def expressible(layout: str, lead: tuple) -> bool:
    """Whether rows with two leading strides can read the layout (reversing three or more dims cannot)."""
    return not (layout == "reversed-dims" and sum(size > 1 for size in lead) > 2)


# ---------------------------------------------------------------------------------------------- distillation_loss

@pytest.mark.parametrize("dims,student_layout,teacher_layout", layout_matrix())
def test_distillation_loss_any_layout_on_each_side(backend, dims, student_layout, teacher_layout):
    lead = LEADS[dims]
    student, student_view = make(student_layout, lead, VOCAB_STUDENT, seed=0)
    teacher_base, teacher_view = make(teacher_layout, lead, VOCAB_TEACHER, seed=1)
    divergence = ("forward_kl", "reverse_kl", "jsd")[(dims + len(student_layout)) % 3]
    check_against_oracle(student, teacher_view(teacher_base), backend=backend, view=student_view,
                         divergence=divergence, beta=0.3, temperature=0.9, reduction="sum")


@pytest.mark.parametrize("sliced,divergence", [("teacher", "forward_kl"), ("student", "jsd")])
def test_sliced_side_matches_torch_backend(backend, sliced, divergence):
    """[2, 3, 4, 17] against a [2, 3, 8, 17][:, :, :4] slice, either way round, equals torch on contiguous copies."""
    whole, half = randn(2, 3, 4, 17), randn(2, 3, 8, 17, seed=1)
    results = []
    for name in (backend, "torch"):
        x = (half if sliced == "student" else whole).clone().requires_grad_()
        student = x[:, :, :4] if sliced == "student" else x
        teacher = half[:, :, :4] if sliced == "teacher" else whole
        if name == "torch":
            student, teacher = student.contiguous(), teacher.contiguous()
        loss = trd_fast.distillation_loss(student, teacher, divergence=divergence, beta=0.3, backend=name)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for got, expected in zip(*results):
        assert_matches(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims,student_layout,teacher_layout", pairs(STUDENT_LAYOUTS, ["inner-slice"], dims_list=(4,)))
def test_inplace_backward_in_any_layout(kernel_backend, dims, student_layout, teacher_layout):
    """The gradient written over strided student logits equals the fresh one and lands in their memory."""
    lead = LEADS[dims]
    student, student_view = make(student_layout, lead, VOCAB_STUDENT, seed=0)
    teacher_base, teacher_view = make(teacher_layout, lead, VOCAB_TEACHER, seed=1)
    teacher = teacher_view(teacher_base)
    _, _, expected = evaluate(student, teacher, backend=kernel_backend, view=student_view, divergence="reverse_kl")
    x = student.clone().requires_grad_()
    trd_fast.distillation_loss(student_view(x), teacher, divergence="reverse_kl", inplace_backward=True,
                               backend=kernel_backend).backward()
    assert_matches(x.grad, expected, rtol=1e-6, atol=1e-8)
    if expressible(student_layout, lead):
        assert_matches(student_view(x.detach()), student_view(expected), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dims", list(LEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rows_are_views_unless_two_strides_cannot_express_them(dims, layout):
    lead = LEADS[dims]
    if not fits(layout, dims):
        pytest.skip(f"{layout} needs more leading dims")
    base, view = make(layout, lead, VOCAB_STUDENT, seed=0)
    x = view(base)
    rows = as_rows(x)
    assert rows.dim() == 3 and rows.stride(-1) == 1
    assert torch.equal(rows.reshape(x.shape), x)
    shares_memory = rows.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert shares_memory == expressible(layout, lead)


# ---------------------------------------------------------------------------------------------- token_logprobs

def token_ids(lead, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, lead, generator=generator)
    return torch.where(torch.rand(lead, generator=generator) < 0.25, torch.full_like(ids, IGNORE), ids)


@pytest.mark.parametrize("dims,logits_layout", [pytest.param(dims, layout, id=f"{dims}d-{layout}")
                                                for dims in LEADS for layout in STUDENT_LAYOUTS
                                                if fits(layout, dims)])
def test_token_logprobs_any_layout(backend, dims, logits_layout):
    """Logits in each layout; the ids always in another one (their dims reversed in memory)."""
    lead = LEADS[dims]
    logits, view = make(logits_layout, lead, VOCAB_STUDENT, seed=0)
    ids = token_ids(lead, VOCAB_STUDENT, seed=2)
    order = tuple(reversed(range(ids.dim())))
    ids = ids.permute(order).contiguous().permute(order)
    upstream = randn(*lead, 1, seed=3, scale=1.0)[..., 0]  # [*lead] (a 0-d tensor for 1-D logits)
    results = []
    for name in (backend, "oracle"):
        base = (logits.double() if name == "oracle" else logits.clone()).requires_grad_()
        out = (reference.token_logprobs(view(base), ids, 0.8) if name == "oracle"
               else trd_fast.token_logprobs(view(base), ids, temperature=0.8, backend=name))
        out.backward(upstream.to(out.dtype))
        results.append((out.detach(), base.grad))
    for got, expected in zip(*results):
        assert_matches(got, expected, **FP32)


# ---------------------------------------------------------------------------------------------- inplace misuse

def reference_grad(make_loss, z):
    z64 = z.detach().double().requires_grad_()
    make_loss(z64, "torch").backward()
    return z64.grad


def two_losses_on_one_tensor(z, backend):
    """Both losses save x for their backward; the first in-place write would corrupt the second's input."""
    teacher = randn(*z.shape, seed=1).to(z.dtype)
    x = z * 1.0
    return (trd_fast.distillation_loss(x, teacher, divergence="forward_kl", inplace_backward=True, backend=backend)
            + trd_fast.distillation_loss(x, teacher, divergence="reverse_kl", inplace_backward=True,
                                         backend=backend))


def loss_after_tanh(z, backend):
    """tanh saves its output, the logits the loss writes its gradient over."""
    teacher = randn(*z.shape, seed=1).to(z.dtype)
    return trd_fast.distillation_loss(torch.tanh(z / 3), teacher, divergence="reverse_kl", inplace_backward=True,
                                      backend=backend)


@pytest.mark.parametrize("make_loss", [two_losses_on_one_tensor, loss_after_tanh], ids=["two-losses", "tanh"])
def test_inplace_misuse_raises_or_is_exact(backend, make_loss):
    z = randn(2, 3, 23).requires_grad_()
    loss = make_loss(z, backend)
    if backend == "torch":  # the reference never writes in place: the gradient is simply right
        loss.backward()
        assert_matches(z.grad, reference_grad(make_loss, z), **FP32)
        return
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_from_an_lm_head_stays_zero_copy(kernel_backend):
    """The intended use: logits straight from a linear head, sliced; the gradient is written over them."""
    torch.manual_seed(0)
    hidden, head = randn(2, 9, 8), torch.nn.Linear(8, 19)
    teacher, mask = randn(2, 8, 19, seed=1), randn(2, 8, seed=2) > 0
    grads = []
    for backend, inplace in ((kernel_backend, True), ("torch", False)):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        logits = head(h)
        trd_fast.distillation_loss(logits[:, :-1], teacher, divergence="jsd", weight=mask,
                                   inplace_backward=inplace, backend=backend).backward()
        grads.append((h.grad, head.weight.grad.clone()))
        if inplace:
            assert not torch.equal(logits.detach(), head(hidden).detach())  # the gradient went over the logits
    for got, expected in zip(*grads):
        assert_matches(got, expected, rtol=1e-5, atol=1e-6)
