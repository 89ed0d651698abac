"""TRL's DistillationTrainer on trd_fast's fused linear op: its hidden-state loss against TRL's own function, the
patch of that module function, and a real DistillationTrainer run patched and unpatched.

TRL is a test dependency (the `test` extra): these tests import it and fail, not skip, without it.
"""

import inspect
import itertools

import pytest
import torch

from tiny_chat import chat_dataset, tiny_lm, tiny_tokenizer

from bench.harness import record_losses
from trd_fast.integrations import chunked_divergence, chunked_divergence_loss, is_patched, patch_trl, unpatch_trl

try:
    import trl.trainer.distillation_trainer as distillation_module
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer
    TRL_LOSS = distillation_module._chunked_divergence_loss  # TRL's own, taken before any test patches it
except (ImportError, AttributeError):  # an older TRL (the supported floor is older): nothing to patch
    pytest.skip("this TRL has no DistillationTrainer on hidden states (_chunked_divergence_loss, read for 1.16.0)",
                allow_module_level=True)
# transformers' own deprecations, tripped by TRL's trainer set-up
pytestmark = pytest.mark.filterwarnings("ignore:`.*` is deprecated and will be removed in v6:FutureWarning")
VALUE_TOL = dict(rtol=2e-5, atol=2e-6)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


@pytest.fixture(autouse=True)
def clean_trl(one_thread):
    """Every test leaves TRL unpatched."""
    yield
    unpatch_trl(DistillationTrainer)
    assert distillation_module._chunked_divergence_loss is TRL_LOSS


def make_inputs(seed=0, batch=2, length=5, student_width=8, teacher_width=12, vocab=37, bias=True):
    """Hidden states [B, K, H_s] and [B, K, H_t] (different widths), LM heads [V, H], biases [V], and a
    completion mask [B, K] with a masked prompt prefix and padding."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(student_hidden_states=torch.randn(batch, length, student_width, generator=g),
                  teacher_hidden_states=torch.randn(batch, length, teacher_width, generator=g),
                  student_lm_head_weight=torch.randn(vocab, student_width, generator=g) / 2,
                  teacher_lm_head_weight=torch.randn(vocab, teacher_width, generator=g) / 2)
    if bias:
        inputs.update(student_lm_head_bias=torch.randn(vocab, generator=g),
                      teacher_lm_head_bias=torch.randn(vocab, generator=g))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, :2] = 0
    mask[-1, -1] = 0
    inputs["completion_mask"] = mask
    return inputs


def run(fn, inputs, beta, **kwargs):
    """(loss, entropy_sum, n_valid) and the gradients of the student's hidden states, head weight and bias,
    with a random upstream gradient."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()
              if k in ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")}
    loss, entropy_sum, n_valid = fn(**{**inputs, **leaves}, beta=beta, **kwargs)
    (loss * 1.7).backward()
    return (loss.detach(), entropy_sum, n_valid), [leaf.grad for leaf in leaves.values()]


def assert_same(ours, theirs):
    (values, grads), (trl_values, trl_grads) = ours, theirs
    for value, trl_value in zip(values, trl_values):
        assert value.dtype == trl_value.dtype and value.shape == trl_value.shape
        torch.testing.assert_close(value, trl_value, **VALUE_TOL)
    assert len(grads) == len(trl_grads)
    for grad, trl_grad in zip(grads, trl_grads):
        torch.testing.assert_close(grad, trl_grad, **GRAD_TOL)


HEADS = {"plain": dict(),
         "scaled": dict(student_logit_scale=0.5, teacher_logit_scale=2.0),
         "softcapped": dict(student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=5.0),
         "scaled+softcapped": dict(student_logit_scale=1.5, teacher_logit_scale=0.25,
                                   student_final_logit_softcapping=2.0, teacher_final_logit_softcapping=4.0)}
CASES = list(itertools.product((0.0, 0.3, 1.0), (1.0, 0.7), HEADS, (None, 5, "tensor")))


@pytest.mark.parametrize("beta,temperature,heads,num_items", CASES)
def test_matches_trl_chunked_divergence_loss(beta, temperature, heads, num_items):
    inputs = make_inputs()
    kwargs = dict(HEADS[heads], temperature=temperature,
                  num_items_in_batch=torch.tensor(7) if num_items == "tensor" else num_items)
    assert_same(run(chunked_divergence_loss, inputs, beta, **kwargs), run(TRL_LOSS, inputs, beta, **kwargs))


def test_every_backend_without_bias(backend):
    inputs = make_inputs(seed=1, bias=False, vocab=19)
    kwargs = dict(HEADS["scaled+softcapped"], temperature=0.8)

    def ours(**kw):
        return chunked_divergence_loss(**kw, backend=backend)
    for beta in (0.0, 0.5):
        assert_same(run(ours, inputs, beta, **kwargs), run(TRL_LOSS, inputs, beta, **kwargs))


def test_all_positions_masked():
    inputs = make_inputs()
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    for num_items in (None, 3):
        assert_same(run(chunked_divergence_loss, inputs, 0.5, num_items_in_batch=num_items),
                    run(TRL_LOSS, inputs, 0.5, num_items_in_batch=num_items))


def test_signature_is_trls():
    """TRL's parameters (names, kinds, defaults), then ours: backend, keyword-only."""
    def described(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    theirs, ours = described(TRL_LOSS), described(chunked_divergence_loss)
    assert ours == theirs + [("backend", inspect.Parameter.KEYWORD_ONLY, None)]


# ------------------------------------------------------------------------------------------------ the patch

def test_patch_class_and_unpatch():
    inputs = make_inputs()
    assert patch_trl(DistillationTrainer) is DistillationTrainer
    patched = distillation_module._chunked_divergence_loss
    assert patched is not TRL_LOSS and patched.__wrapped__ is TRL_LOSS
    assert inspect.signature(patched) == inspect.signature(TRL_LOSS)
    trainer = DistillationTrainer.__new__(DistillationTrainer)
    assert is_patched(DistillationTrainer) and is_patched(trainer)
    kwargs = dict(HEADS["scaled+softcapped"], num_items_in_batch=6)
    assert_same(run(patched, inputs, 0.4, **kwargs), run(TRL_LOSS, inputs, 0.4, **kwargs))
    patch_trl(DistillationTrainer, backend="torch")  # patching again replaces the options
    assert distillation_module._chunked_divergence_loss.__wrapped__ is TRL_LOSS
    unpatch_trl(DistillationTrainer)
    assert distillation_module._chunked_divergence_loss is TRL_LOSS and not is_patched(DistillationTrainer)


def test_patch_a_subclass_patches_the_shared_function():
    class MyDistillation(DistillationTrainer):
        pass
    patch_trl(MyDistillation)
    assert is_patched(DistillationTrainer) and is_patched(MyDistillation)
    unpatch_trl(MyDistillation)
    assert not is_patched(DistillationTrainer)


def test_an_instance_cannot_be_patched_alone():
    trainer = DistillationTrainer.__new__(DistillationTrainer)
    for fn in (patch_trl, unpatch_trl):
        with pytest.raises(ValueError, match="trainer: .*patch the class"):
            fn(trainer)
    assert not is_patched(DistillationTrainer)


def test_refuses_a_changed_signature(monkeypatch):
    def changed(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                completion_mask, beta, num_items_in_batch=None):
        raise AssertionError
    monkeypatch.setattr(distillation_module, "_chunked_divergence_loss", changed)
    with pytest.raises(RuntimeError, match="differs from the signature"):
        patch_trl(DistillationTrainer)
    assert distillation_module._chunked_divergence_loss is changed


def test_a_trl_without_the_loss(monkeypatch):
    """Where the module has no such function, patching the class is refused and patch_trl() leaves it out."""
    monkeypatch.delattr(distillation_module, "_chunked_divergence_loss")
    with pytest.raises(RuntimeError, match="has no _chunked_divergence_loss"):
        patch_trl(DistillationTrainer)
    patched = patch_trl()
    unpatch_trl()
    assert DistillationTrainer not in patched and patched


# ------------------------------------------------------------------------------------------------ a real trainer

def first_step_losses(tmp_path, patch):
    """One DistillationTrainer step (2 micro-batches of 2 prompts, completions sampled by the student, seeded):
    the loss of each micro-batch, and the logged metrics."""
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, beta=0.5, temperature=0.9, max_completion_length=8,
                              learning_rate=1e-2, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                              seed=0, disable_tqdm=True)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    trainer = DistillationTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1), args=args,
                                  train_dataset=chat_dataset(prompts_only=True), processing_class=tokenizer)
    patch(trainer)
    losses = record_losses(trainer)
    trainer.train()
    assert trainer.state.global_step == 1 and len(losses) == 2
    return losses, trainer.state.log_history[0]


def test_distillation_trainer_patched_gives_trls_first_step(tmp_path, monkeypatch):
    calls = []
    ours = chunked_divergence.chunked_divergence_loss

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return ours(*args, **kwargs)
    monkeypatch.setattr(chunked_divergence, "chunked_divergence_loss", counting)
    reference, reference_log = first_step_losses(tmp_path / "trl", lambda trainer: None)
    assert not calls
    patched, patched_log = first_step_losses(tmp_path / "ours",
                                             lambda trainer: patch_trl(type(trainer), backend="cpp"))
    assert calls == ["cpp", "cpp"]
    assert all(0.01 < loss < 100 for loss in reference)
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(reference), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(patched_log["entropy"]), torch.tensor(reference_log["entropy"]),
                               rtol=1e-5, atol=1e-6)
