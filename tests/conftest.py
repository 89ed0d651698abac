"""Shared fixtures and helpers: backend parametrization, input makers, the float64 oracle, tolerances.

TRITON_INTERPRET=1 must be set before anything imports triton: it is the first thing this file does.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # TRITON_INTERPRET=0 runs tests/test_triton_gpu.py on a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

import trd_fast  # noqa: E402
from trd_fast import reference  # noqa: E402
from trd_fast.ops import registry as backend_module  # noqa: E402

BACKENDS = ("torch", "cpp", "triton")
KERNEL_BACKENDS = ("cpp", "triton")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]

# fp32 inputs against the float64 oracle; fp64 inputs on the backends that compute in fp64.
FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)


def pytest_configure(config):
    # The Triton interpreter runs kernels through numpy, which warns on the inf/NaN arithmetic that the -inf
    # and NaN tests do on purpose.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("filterwarnings", "ignore:invalid value encountered:RuntimeWarning:numpy")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def require_backend(name: str) -> str:
    """Skip a backend only where it cannot exist here; a missing C++ build is a failure, not a skip."""
    if name == "cpp" and backend_module.EXTENSION is None:
        if _flag("TRD_FAST_SKIP_EXT"):
            pytest.skip("TRD_FAST_SKIP_EXT=1: torch-only install without trd_fast._C")
        pytest.fail(f"backend 'cpp': {backend_module.EXTENSION_MISSING} "
                    "(set TRD_FAST_SKIP_EXT=1 only for a deliberate torch-only install)")
    if name == "triton" and not backend_module.TRITON_INSTALLED:
        pytest.skip("the triton package is not installed")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend: torch (the reference), cpp (trd_fast._C), triton (interpreted on CPU)."""
    return require_backend(request.param)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """The fused-kernel backends (the ones that implement inplace_backward for real)."""
    return require_backend(request.param)


@pytest.fixture(params=("torch", "cpp"))
def half_backend(request):
    """Backends checked on bf16/fp16 here (bf16 Triton is GPU-only: the interpreter's bf16 is unreliable)."""
    return require_backend(request.param)


# ---------------------------------------------------------------------------------------------- inputs

@pytest.fixture
def one_thread():
    """Tiny models: one thread (a second OpenMP thread on a busy 2-core box costs ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, seed=0, scale=2.0, dtype=torch.float32):
    """Deterministic N(0, scale^2) values in `dtype` (drawn in fp32, so every dtype sees the same numbers)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def rand(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator)


def sparse_teacher(lead, k, vocab, *, seed=0, empty=0.25, dtype=torch.float32):
    """A SparseTeacher with k distinct ids per position in [0, vocab), a fraction `empty` of slots -1."""
    generator = torch.Generator().manual_seed(seed)
    n = 1
    for size in lead:
        n *= size
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(n)]) if n else \
        torch.empty(0, k, dtype=torch.int64)
    holes = torch.rand(ids.shape, generator=generator) < empty
    holes[:, 0] = False  # keep every position non-empty (an all-empty row is the all -inf case)
    ids = torch.where(holes, torch.full_like(ids, -1), ids)
    logprobs = torch.log_softmax(torch.randn(ids.shape, generator=generator) * 2, dim=-1).to(dtype)
    return trd_fast.SparseTeacher(ids.reshape(*lead, k), logprobs.reshape(*lead, k))


def to64(x):
    if isinstance(x, trd_fast.SparseTeacher):
        return trd_fast.SparseTeacher(x.ids, x.logprobs.double())
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


# ---------------------------------------------------------------------------------------------- runs

def evaluate(student, teacher, *, backend, grad_output=None, view=None, **kwargs):
    """(loss, per_token, grad) of distillation_loss on `backend`, or of the float64 oracle for "oracle".

    `student` is a base tensor; `view` (e.g. lambda s: s[:, :-1]) is applied after requires_grad so the op
    sees the strided view and the gradient lands in the base. `grad_output` (default ones) is the upstream
    gradient of the loss.
    """
    if backend == "oracle":
        base = student.detach().double().requires_grad_()
        teacher = to64(teacher)
        kwargs = {key: to64(value) for key, value in kwargs.items()}
        fn = reference.distillation_loss
    else:
        base = student.detach().clone().requires_grad_()

        def fn(s, t, **kw):
            return trd_fast.distillation_loss(s, t, backend=backend, **kw)
    x = view(base) if view is not None else base
    loss, per_token = fn(x, teacher, return_per_token=True, **kwargs)
    upstream = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(upstream)
    return loss.detach(), per_token, base.grad


def assert_matches(actual, expected, *, rtol, atol):
    """Values compared in float64 (inf == inf, NaN == NaN), with explicit tolerances."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def gradient_tolerance(tol, per_token, *, temperature=1.0, logit_size=0.0, grad_output=None):
    """The gradient's absolute tolerance, from how its fp32 rounding scales: a reverse-KL or JSD gradient
    g p (log p - log q - l) / T carries the rounding of terms as large as |l|; log p = s / T - A carries that
    of |s| / T (2 eps |s| / T: a backward-stable error, the exact gradient of logits perturbed by eps); and
    everything is multiplied by the upstream gradient g and 1 / T."""
    finite = per_token[torch.isfinite(per_token)].abs()
    size = max(1.0, float(finite.max()) if finite.numel() else 1.0) / min(1.0, temperature)
    if grad_output is not None and grad_output.numel():
        size *= max(1.0, float(grad_output.abs().max()))
    atol = max(tol["atol"], 2 * torch.finfo(torch.float32).eps * logit_size)
    return dict(rtol=tol["rtol"], atol=atol * size)


def logit_size(student, teacher, temperature=1.0):
    """max |x| / T over the finite student and teacher logits (or SparseTeacher log-probs)."""
    teacher = teacher.logprobs if isinstance(teacher, trd_fast.SparseTeacher) else teacher
    values = torch.cat([student.detach().double().flatten(), teacher.detach().double().flatten()])
    values = values[torch.isfinite(values)]
    return float(values.abs().max()) / temperature if values.numel() else 0.0


def logit_gap(student, teacher, temperature=1.0):
    """max |s - t| / T over the support (finite entries): fp32 rounding of the log-ratio terms a divergence is
    a q- or p-weighted mean of is ~ eps times this, so a value cannot be more accurate in general (for V = 1
    the exact value is 0 whatever the gap, but log q - log p is computed from s - t all the same)."""
    s = student.detach().double()
    if isinstance(teacher, trd_fast.SparseTeacher):
        ids = teacher.ids
        gap = torch.where(ids >= 0, (s.gather(-1, ids.clamp(min=0)) - teacher.logprobs.double()).abs(), 0.0)
    else:
        width = min(s.shape[-1], teacher.shape[-1])
        gap = (s[..., :width] - teacher[..., :width].double()).abs()
    gap = gap[torch.isfinite(gap)]
    return float(gap.max()) / temperature if gap.numel() else 0.0


def check_against_oracle(student, teacher, *, backend, tol=FP32, grad_output=None, view=None, **kwargs):
    """Per-token values and student gradient of `backend` against the float64 oracle, and its loss against the
    float64 reduction of its own per-token values (the reduction is exact arithmetic on them).

    Per-token values get an absolute tolerance of at least 8 eps(fp32) * max |s - t| / T (see logit_gap)."""
    loss, per_token, grad = evaluate(student, teacher, backend=backend, grad_output=grad_output, view=view,
                                     **kwargs)
    ref_loss, ref_per_token, ref_grad = evaluate(student, teacher, backend="oracle", grad_output=grad_output,
                                                 view=view, **kwargs)
    assert loss.dtype == torch.float32
    assert per_token.dtype == torch.float32 and not per_token.requires_grad
    assert grad.dtype == student.dtype and grad.shape == student.shape
    temperature = kwargs.get("temperature", 1.0)
    gap = logit_gap(view(student) if view is not None else student, teacher, temperature)
    value_tol = dict(rtol=tol["rtol"], atol=max(tol["atol"], 8 * torch.finfo(torch.float32).eps * gap))
    assert_matches(per_token, ref_per_token, **value_tol)
    reduce_options = {k: to64(kwargs[k]) for k in ("clip", "weight", "normalizer", "reduction") if k in kwargs}
    assert_matches(loss, reference.reduce(per_token.double(), **reduce_options), **tol)
    if value_tol["atol"] == tol["atol"]:
        assert_matches(loss, ref_loss, **tol)
    x = view(student) if view is not None else student
    assert_matches(grad, ref_grad, **gradient_tolerance(tol, ref_per_token, temperature=temperature,
                                                        logit_size=logit_size(x, teacher, temperature),
                                                        grad_output=grad_output))
    return loss, per_token, grad
