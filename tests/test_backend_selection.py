"""Backend choice: the backend= argument, TRD_FAST_BACKEND, and "auto" (C++ on CPU when built, Triton on CUDA,
the torch reference with one warning when the extension is missing)."""

import sys
import warnings

import pytest
import torch
from conftest import rand, randn, require_backend

import trd_fast
from trd_fast import reference
from trd_fast.ops import registry as backend_module

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only resolved, never allocated on: no GPU needed
OP_MODULES = ("trd_fast.ops.distillation", "trd_fast.ops.token_logprobs", "trd_fast.ops.prefix_scan")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("TRD_FAST_BACKEND", raising=False)
    return monkeypatch


def test_auto_on_cpu_is_cpp(no_env):
    require_backend("cpp")
    assert backend_module.resolve(None, CPU) == "cpp"
    assert backend_module.resolve("auto", CPU) == "cpp"


def test_auto_on_cuda_is_triton(no_env):
    require_backend("triton")
    assert backend_module.resolve(None, CUDA) == "triton"


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_env_selects_and_argument_overrides(no_env, name):
    require_backend(name)
    no_env.setenv("TRD_FAST_BACKEND", name)
    assert backend_module.resolve(None, CPU) == name
    assert backend_module.resolve("torch", CPU) == "torch"
    no_env.setenv("TRD_FAST_BACKEND", "auto")
    require_backend("cpp")
    assert backend_module.resolve(None, CPU) == "cpp"


def test_unknown_names(no_env):
    no_env.setenv("TRD_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="TRD_FAST_BACKEND"):
        backend_module.resolve(None, CPU)
    assert backend_module.resolve("torch", CPU) == "torch"  # an explicit argument does not read the variable
    with pytest.raises(ValueError, match="backend"):
        backend_module.resolve("CPP", CPU)


def test_missing_extension_falls_back_to_torch_with_one_warning(no_env):
    no_env.setattr(backend_module, "EXTENSION", None)
    no_env.setattr(backend_module, "EXTENSION_MISSING", "trd_fast._C is not built (test)")
    no_env.setattr(backend_module, "_warned", False)
    with pytest.warns(UserWarning, match="not built"):
        assert backend_module.resolve(None, CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_module.resolve("auto", CPU) == "torch"
    with pytest.raises(ValueError, match="cpp"):
        backend_module.resolve("cpp", CPU)


def test_device_restrictions(no_env):
    require_backend("cpp")
    with pytest.raises(ValueError, match="cpp"):
        backend_module.resolve("cpp", CUDA)
    no_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backend_module.resolve("triton", CPU)


@pytest.fixture
def spy(no_env):
    """Records which backend each public op ran on: the kernel op set it fetched, or the torch reference."""
    calls = []
    for module_name in OP_MODULES:
        module = sys.modules[module_name]
        no_env.setattr(module, "opset", lambda name, real=module.opset: calls.append(name) or real(name))
    for name in ("per_position_divergence", "token_logprobs", "prefix_scan"):
        no_env.setattr(reference, name, lambda *a, real=getattr(reference, name), **k: calls.append("torch")
                       or real(*a, **k))
    return calls


@pytest.mark.parametrize("env,argument,expected", [(None, None, "cpp"), (None, "auto", "cpp"),
                                                   ("torch", None, "torch"), ("triton", None, "triton"),
                                                   ("auto", None, "cpp"), ("torch", "cpp", "cpp"),
                                                   ("cpp", "torch", "torch"), ("cpp", "triton", "triton")])
def test_dispatch_end_to_end(spy, no_env, env, argument, expected):
    require_backend(expected)
    require_backend("cpp")  # auto on CPU means cpp
    if env is not None:
        no_env.setenv("TRD_FAST_BACKEND", env)
    student, teacher = randn(2, 3, 11), randn(2, 3, 11, seed=1)
    loss = trd_fast.distillation_loss(student, teacher, weight=rand(2, 3) > 0.5, backend=argument)
    logp = trd_fast.token_logprobs(student, torch.zeros(2, 3, dtype=torch.int64), backend=argument)
    cumsum, first = trd_fast.prefix_scan(rand(2, 5), torch.tensor([5, 2]), threshold=0.5, backend=argument)
    assert spy == [expected] * 3
    no_env.delenv("TRD_FAST_BACKEND", raising=False)
    assert torch.equal(loss, trd_fast.distillation_loss(student, teacher, weight=rand(2, 3) > 0.5, backend=expected))
    assert torch.equal(logp, trd_fast.token_logprobs(student, torch.zeros(2, 3, dtype=torch.int64), backend=expected))
    assert torch.equal(first, trd_fast.prefix_scan(rand(2, 5), torch.tensor([5, 2]), threshold=0.5,
                                                   backend=expected)[1])


@pytest.mark.parametrize("built, here, refused", [
    ("avx512", "avx2", True), ("avx512", "default", True), ("avx2", "default", True),
    ("avx512", "avx512", False), ("avx2", "avx512", False), ("default", "avx2", False),
])
def test_extension_for_a_missing_simd_level_is_refused(built, here, refused):
    message = backend_module.isa_refusal(built, here)
    assert (message is not None) == refused
    if refused:
        assert built in message and "TRD_FAST_CPU_ISA=" in message


def test_loaded_extension_matches_this_cpu():
    if backend_module.EXTENSION is None:
        pytest.skip("no trd_fast._C in this install")
    here = torch.backends.cpu.get_cpu_capability().lower()
    assert backend_module.isa_refusal(backend_module.EXTENSION.cpu_isa(), here) is None
