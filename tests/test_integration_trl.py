"""The TRL integration against TRL itself: its own generalized_jsd_loss and a real GKDTrainer run.

TRL is a test dependency (the `test` extra): these tests import it and fail, not skip, without it.
"""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on every import otherwise

import inspect  # noqa: E402
import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.experimental.gold import GOLDTrainer  # noqa: E402

from tiny_chat import chat_dataset, tiny_lm, tiny_tokenizer  # noqa: E402

from bench.harness import record_losses  # noqa: E402
from trd_fast.integrations import gkd_loss  # noqa: E402
from trd_fast.integrations import generalized_jsd_loss, is_patched, patch_trl, unpatch_trl  # noqa: E402

try:
    from trl.experimental.iw_opd import IWOPDTrainer
except ImportError:  # TRL before 1.12.0 (the supported floor is older) has no IW-OPD trainer
    IWOPDTrainer = None
try:
    from trl.trainer.distillation_trainer import DistillationTrainer, _chunked_divergence_loss  # noqa: F401
except ImportError:  # an older TRL: no DistillationTrainer on hidden states (patch_trl() leaves it out)
    DistillationTrainer = None

ATTRIBUTE = "generalized_jsd_loss"
TRAINERS = tuple(cls for cls in (GKDTrainer, GOLDTrainer, IWOPDTrainer) if cls is not None)  # the installed ones
# TRL's own functions, taken before any test patches anything.
TRL_LOSS = {cls: inspect.getattr_static(cls, ATTRIBUTE).__func__ for cls in TRAINERS}
NO_IWOPD = pytest.mark.skipif(IWOPDTrainer is None, reason="this TRL has no IW-OPD trainer (added in 1.12.0)")
# GKDConfig's own default trips this transformers deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
VALUE_TOL = dict(rtol=2e-5, atol=2e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


@pytest.fixture(autouse=True)
def one_thread_and_clean_trl():
    """Tiny tensors: one thread (a second OpenMP thread on a busy 2-core box costs ms per op); every test
    leaves TRL unpatched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for cls in TRL_LOSS:
        unpatch_trl(cls)
        assert inspect.getattr_static(cls, ATTRIBUTE).__func__ is TRL_LOSS[cls]


def make_inputs(shape=(2, 7, 37), seed=0, dtype=torch.float32):
    """Student base logits [B, T+1, V] (the loss sees the [:, :-1] view, as GKDTrainer passes it), teacher
    logits [B, T, V], labels [B, T] with -100 on a prompt prefix and on padding."""
    generator = torch.Generator().manual_seed(seed)
    b, t, v = shape
    student = (torch.randn(b, t + 1, v, generator=generator) * 2).to(dtype)
    teacher = (torch.randn(b, t, v, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=generator)
    labels[0, :2] = -100
    labels[1, t - 3:] = -100
    return student, teacher, labels


def run(fn, student_base, teacher, **kwargs):
    """(value, gradient w.r.t. the student) of fn on the [:, :-1] view; a non-scalar value is summed with
    fixed random weights so every element's gradient is checked."""
    base = student_base.detach().clone().requires_grad_()
    value = fn(base[:, :-1], teacher, **kwargs)
    weights = torch.rand(value.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (value.double() * weights).sum().backward()
    return value.detach(), base.grad


def assert_same(ours, theirs, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    (value, grad), (trl_value, trl_grad) = ours, theirs
    assert value.dtype == trl_value.dtype and value.shape == trl_value.shape
    torch.testing.assert_close(value, trl_value, equal_nan=True, **value_tol)
    torch.testing.assert_close(grad, trl_grad, **grad_tol)


# ------------------------------------------------------------------------------------------------ the function

CASES = list(itertools.product((0.0, 0.3, 0.5, 1.0), (1.0, 0.5, 2.0), ("batchmean", "sum", "mean", "none"),
                               ("labels", "no labels"), (None, 7, "tensor")))


@pytest.mark.parametrize("beta,temperature,reduction,labelled,num_items", CASES)
def test_matches_trl_generalized_jsd_loss(beta, temperature, reduction, labelled, num_items):
    student, teacher, labels = make_inputs()
    num = torch.tensor(11) if num_items == "tensor" else num_items
    kwargs = dict(labels=labels if labelled == "labels" else None, beta=beta, temperature=temperature,
                  reduction=reduction, num_items_in_batch=num)
    assert_same(run(generalized_jsd_loss, student, teacher, **kwargs),
                run(TRL_LOSS[GKDTrainer], student, teacher, **kwargs))


def test_signature_is_trls():
    assert inspect.signature(generalized_jsd_loss) == inspect.signature(TRL_LOSS[GKDTrainer])


@pytest.mark.parametrize("beta", (0.0, 0.4, 1.0))
def test_every_backend(backend, beta):
    student, teacher, labels = make_inputs((2, 4, 19))

    def ours(s, t, **kw):
        return gkd_loss.jsd_loss(s, t, backend=backend, **kw)
    for kwargs in (dict(labels=labels), dict(labels=labels, num_items_in_batch=5), dict(reduction="mean")):
        assert_same(run(ours, student, teacher, beta=beta, temperature=0.7, **kwargs),
                    run(TRL_LOSS[GKDTrainer], student, teacher, beta=beta, temperature=0.7, **kwargs))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_dtype_and_accuracy(dtype):
    """TRL returns the logits' dtype: so do we. Ours computes in fp32, so it is at least as close to TRL's
    fp32 value as TRL's own half-precision value is (TRL rounds beta itself to the half dtype)."""
    student, teacher, labels = make_inputs(dtype=dtype)
    kwargs = dict(labels=labels, beta=0.5, temperature=1.0)
    value, grad = run(generalized_jsd_loss, student, teacher, **kwargs)
    trl_value, trl_grad = run(TRL_LOSS[GKDTrainer], student, teacher, **kwargs)
    exact, exact_grad = run(TRL_LOSS[GKDTrainer], student.float(), teacher.float(), **kwargs)
    assert value.dtype == trl_value.dtype == dtype and grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert abs(value.float() - exact) <= abs(trl_value.float() - exact) + eps * abs(exact)
    assert (grad.float() - exact_grad).abs().max() <= (trl_grad.float() - exact_grad).abs().max() + 1e-6


def test_mixed_dtypes_promote_like_trl():
    """An fp32 student and a bf16 teacher: TRL returns fp32, and so do we. TRL takes the teacher's log-softmax
    in bf16; ours is fp32 math on the bf16 values, i.e. TRL's result on those values upcast."""
    student, teacher, labels = make_inputs()
    teacher = teacher.to(torch.bfloat16)
    kwargs = dict(labels=labels, beta=0.3)
    ours = run(generalized_jsd_loss, student, teacher, **kwargs)
    assert ours[0].dtype == run(TRL_LOSS[GKDTrainer], student, teacher, **kwargs)[0].dtype == torch.float32
    assert_same(ours, run(TRL_LOSS[GKDTrainer], student, teacher.float(), **kwargs))


def test_unequal_vocabularies_use_the_common_columns():
    """TRL raises on unequal vocabularies; ours compares the common columns, i.e. TRL on the sliced logits."""
    student, teacher, labels = make_inputs((2, 5, 40))
    for kwargs in (dict(labels=labels, beta=0.5), dict(labels=labels, reduction="mean", beta=0.0),
                   dict(labels=labels, reduction="none", beta=1.0)):
        value, grad = run(generalized_jsd_loss, student, teacher[..., :33], **kwargs)
        trl_value, trl_grad = run(TRL_LOSS[GKDTrainer], student[..., :33], teacher[..., :33], **kwargs)
        torch.testing.assert_close(value, trl_value, **VALUE_TOL)
        torch.testing.assert_close(grad[..., :33], trl_grad, **GRAD_TOL)
        assert torch.all(grad[..., 33:] == 0)


def test_all_positions_masked():
    student, teacher, labels = make_inputs()
    labels = torch.full_like(labels, -100)
    for kwargs in (dict(reduction="batchmean"), dict(reduction="sum"), dict(reduction="mean"),
                   dict(num_items_in_batch=3)):
        assert_same(run(generalized_jsd_loss, student, teacher, labels=labels, **kwargs),
                    run(TRL_LOSS[GKDTrainer], student, teacher, labels=labels, **kwargs))


def test_bad_arguments_raise():
    student, teacher, labels = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(student[:, :-1], teacher, reduction="average")
    with pytest.raises(ValueError, match="labels"):
        generalized_jsd_loss(student[:, :-1], teacher, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(student[:, :-1], teacher, beta=1.5)


def test_inplace_backward_gives_the_same_gradient():
    """The gradient may overwrite the student logits: here they come out of a Linear (an LM head)."""
    generator = torch.Generator().manual_seed(3)
    hidden, teacher = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 5, 29, generator=generator)
    labels = torch.randint(0, 29, (2, 5), generator=generator)
    labels[0, 0] = -100
    grads = []
    for inplace in (False, True):
        head = torch.nn.Linear(8, 29)
        torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(4))
        torch.nn.init.zeros_(head.bias)
        loss = gkd_loss.jsd_loss(head(hidden)[:, :-1], teacher, labels, beta=0.5, inplace_backward=inplace)
        loss.backward()
        grads.append(head.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ the patch

@pytest.mark.parametrize("cls", TRAINERS, ids=lambda c: c.__name__)
def test_patched_trainer_losses_match_trl(cls):
    student, teacher, labels = make_inputs()
    patch_trl(cls)
    patched = inspect.getattr_static(cls, ATTRIBUTE).__func__
    assert is_patched(cls) and patched is not TRL_LOSS[cls]
    assert inspect.signature(cls.generalized_jsd_loss) == inspect.signature(TRL_LOSS[cls])
    for kwargs in (dict(labels=labels, beta=0.5, num_items_in_batch=9), dict(labels=labels, beta=0.0),
                   dict(beta=1.0, temperature=2.0, reduction="sum")):
        assert_same(run(cls.generalized_jsd_loss, student, teacher, **kwargs),
                    run(TRL_LOSS[cls], student, teacher, **kwargs))


@pytest.mark.parametrize("cls,extra", [
    pytest.param(GOLDTrainer, dict(logits_are_probs=True), id="gold-probs"),
    pytest.param(IWOPDTrainer, dict(top_k=3), id="iwopd-topk-tail", marks=NO_IWOPD),
    pytest.param(IWOPDTrainer, dict(top_k=3, add_tail=False), id="iwopd-topk", marks=NO_IWOPD)])
def test_trl_only_options_run_trls_own_function(cls, extra, monkeypatch):
    """A trainer's own loss options (GOLD's probability inputs, IW-OPD's top-k support) go to TRL's function,
    bit for bit; our kernel is not called."""
    student, teacher, labels = make_inputs()
    if extra.get("logits_are_probs"):
        student, teacher = student.softmax(-1), teacher.softmax(-1)
    monkeypatch.setattr(gkd_loss, "jsd_loss", _must_not_be_called)
    patch_trl(cls)
    ours = run(cls.generalized_jsd_loss, student, teacher, labels=labels, **extra)
    theirs = run(TRL_LOSS[cls], student, teacher, labels=labels, **extra)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("trd_fast's kernel was called for an option only TRL's function implements")


def test_patch_instance_and_unpatch():
    trainer = GKDTrainer.__new__(GKDTrainer)  # the patch needs only the type and the instance dict
    other = GKDTrainer.__new__(GKDTrainer)
    assert patch_trl(trainer) is trainer
    assert is_patched(trainer) and not is_patched(other) and not is_patched(GKDTrainer)
    patch_trl(trainer, backend="torch")  # patching again replaces the options, keeps what to restore
    assert trainer.generalized_jsd_loss.__wrapped__ is TRL_LOSS[GKDTrainer]
    unpatch_trl(trainer)
    assert ATTRIBUTE not in vars(trainer) and not is_patched(trainer)


def test_patching_a_liger_trainer_warns():
    trainer = GKDTrainer.__new__(GKDTrainer)
    trainer.use_liger_gkd_loss = True  # TRL 1.7-1.14 with use_liger_kernel=True: generalized_jsd_loss is not called
    with pytest.warns(UserWarning, match="changes nothing"):
        patch_trl(trainer)


def test_patch_subclass_and_class_then_unpatch():
    class MyGKD(GKDTrainer):
        pass
    patch_trl(GKDTrainer)
    patch_trl(MyGKD)  # over the inherited patch: still wraps TRL's function, not our wrapper
    assert MyGKD.generalized_jsd_loss.__wrapped__ is TRL_LOSS[GKDTrainer]
    unpatch_trl(MyGKD)
    assert ATTRIBUTE not in vars(MyGKD) and is_patched(MyGKD)  # the class patch is inherited again
    unpatch_trl(GKDTrainer)
    assert not is_patched(MyGKD)


def test_patch_all_installed_trainers():
    patched = patch_trl()
    assert set(patched) == {*TRAINERS, DistillationTrainer} - {None} and all(map(is_patched, patched))
    unpatch_trl()
    assert not any(map(is_patched, patched))


def test_refuses_what_it_was_not_checked_against(monkeypatch):
    class Changed(GKDTrainer):
        @staticmethod
        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", num_items_in_batch=None, top_k=0):
            raise AssertionError
    with pytest.raises(RuntimeError, match="differs from the signature"):
        patch_trl(Changed)
    with pytest.raises(ValueError, match="trainer"):
        patch_trl(torch.nn.Module)
    import trl
    monkeypatch.setattr(trl, "__version__", "1.6.0")
    with pytest.raises(RuntimeError, match=r"TRL >= 1\.7\.0"):
        patch_trl(GKDTrainer)
    monkeypatch.setattr(trl, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="newer than the newest version checked"):
        patch_trl(GKDTrainer)


def test_importing_trd_fast_imports_no_trl_and_patches_nothing():
    code = ("import sys\n"
            "import trd_fast, trd_fast.integrations, trd_fast.integrations.trl, trd_fast.integrations.gkd_loss\n"
            "assert 'trl' not in sys.modules, 'trl imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # this module imported trd_fast.integrations before TRL_LOSS was taken: TRL's functions are still TRL's
    for cls, function in TRL_LOSS.items():
        assert function.__module__ == cls.__module__ and not hasattr(function, "trd_fast_target")


# ------------------------------------------------------------------------------------------------ a real GKDTrainer

def train_gkd(tmp_path, patch):
    """Two GKDTrainer steps (lmbda=0: the dataset's completions, no generation); the loss of each step."""
    args = GKDConfig(output_dir=str(tmp_path), lmbda=0.0, beta=0.5, max_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1,
                     save_strategy="no", use_cpu=True, seed=0, max_length=64, disable_tqdm=True)
    trainer = GKDTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1), args=args, train_dataset=chat_dataset(),
                         processing_class=tiny_tokenizer())
    patch(trainer)
    losses = record_losses(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and len(losses) == 4  # 2 steps x 2 accumulated micro-batches
    return losses


def test_gkd_trainer_trains_with_the_patched_loss(tmp_path, monkeypatch):
    calls = []
    jsd_loss = gkd_loss.jsd_loss

    def counting(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch", args[6] if len(args) > 6 else None))
        return jsd_loss(*args, **kwargs)
    monkeypatch.setattr(gkd_loss, "jsd_loss", counting)
    reference = train_gkd(tmp_path / "trl", lambda trainer: None)
    assert not calls
    ours = train_gkd(tmp_path / "ours", patch_trl)
    assert len(calls) == 4 and all(c is not None for c in calls)  # GA-correct path: num_items_in_batch given
    assert all(0.01 < loss < 100 for loss in reference)
    # the first step (both micro-batches) sees the same weights: the same loss; later steps drift by fp32 noise
    torch.testing.assert_close(torch.tensor(ours[:2]), torch.tensor(reference[:2]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(ours[2:]), torch.tensor(reference[2:]), rtol=1e-3, atol=1e-6)


def test_gkd_trainer_class_patch(tmp_path):
    patch_trl(GKDTrainer)
    losses = train_gkd(tmp_path, lambda trainer: assert_patched(trainer))
    assert all(0.01 < loss < 100 for loss in losses)


def assert_patched(trainer):
    assert is_patched(trainer) and ATTRIBUTE not in vars(trainer)
