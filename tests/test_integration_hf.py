"""DistillTrainer: distillation with a real transformers.Trainer and DistillationLoss, on logits and (fused_linear)
on hidden states."""

import pytest
import torch
from datasets import Dataset
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM,
                          TrainingArguments)

import trd_fast
from trd_fast.integrations import DistillTrainer
from trd_fast.heads import final_hidden_states

VOCAB = 48
# Tiny causal LMs whose LM heads differ: (config, model class, what the architecture adds to h W^T)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "cohere logit_scale": (CohereConfig, CohereForCausalLM, dict(logit_scale=0.25)),
    "gemma2 softcap": (Gemma2Config, Gemma2ForCausalLM, dict(final_logit_softcapping=2.0, head_dim=8)),
    "granite logits_scaling": (GraniteConfig, GraniteForCausalLM, dict(logits_scaling=4.0)),
    "phi head bias": (PhiConfig, PhiForCausalLM, {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(seed, vocab=VOCAB):
    """A 2-layer Llama with random weights, spread wide enough that student and teacher disagree."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


def tiny_model(architecture, seed, vocab=VOCAB, width=32):
    """A 2-layer model of `architecture` (ARCHITECTURES) with random weights spread wide (initializer 0.5)."""
    config_class, model_class, extra = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.5, pad_token_id=0, bos_token_id=None, eos_token_id=None, **extra)
    return model_class(config)


def dataset(n=4, seed=0):
    """Prompt + completion token ids; labels -100 on the prompt. Lengths and prompt sizes differ per row, so
    rows have different numbers of trained positions (what makes gradient-accumulation normalisation matter)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt, completion = 2 + i, 3 + 3 * i
        ids = torch.randint(1, VOCAB, (prompt + completion,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(rows)


def collate(rows):
    """Right padding: input_ids with 0, labels with -100, attention_mask 0 on padding."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])
    ids = pad("input_ids", 0)
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": pad("labels", -100)}


def make_trainer(tmp_path, *, batch, accumulation, steps, loss=None, optim="adamw_torch", lr=1e-2, fused_linear=False,
                 student=None, teacher=None):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             optim=optim, lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             remove_unused_columns=False)
    return DistillTrainer(model=student or tiny_lm(0), teacher_model=teacher or tiny_lm(1), args=args,
                          train_dataset=dataset(), data_collator=collate, loss=loss, fused_linear=fused_linear)


def recorded_losses(trainer, batches=None):
    """The loss of every compute_loss call, in order (and its inputs into `batches` if given)."""
    losses = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **kw):
        if batches is not None:
            batches.append({k: v.clone() for k, v in inputs.items()})
        loss = compute_loss(model, inputs, *a, **kw)
        losses.append(float(loss.detach()))
        return loss
    trainer.compute_loss = recording
    return losses


def test_two_step_distillation_run(tmp_path):
    loss = trd_fast.DistillationLoss(divergence="jsd", beta=0.5, temperature=2.0)
    trainer = make_trainer(tmp_path, batch=2, accumulation=1, steps=2, loss=loss)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batches = []
    losses = recorded_losses(trainer, batches)
    trainer.train()
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] > 0.01
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    # the first step's loss: the divergence at trained positions (labels[t + 1] != -100), averaged over them
    first = batches[0]
    with torch.no_grad():
        s = tiny_lm(0)(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        t = tiny_lm(1)(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    weight = first["labels"][:, 1:] != -100
    expected = trd_fast.distillation_loss(s[:, :-1], t[:, :-1], divergence="jsd", beta=0.5, temperature=2.0,
                                          weight=weight)
    torch.testing.assert_close(torch.tensor(losses[0]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused_linear", (False, True), ids=("logits", "fused_linear"))
def test_gradient_accumulation_gives_the_large_batch_update(tmp_path, fused_linear):
    """One SGD step over 4 rows: one batch of 4, or 2 micro-batches of 2 accumulated. num_items_in_batch
    normalisation makes both the mean over all 4 rows' trained positions, so the weights agree."""
    whole = make_trainer(tmp_path / "whole", batch=4, accumulation=1, steps=1, optim="sgd", lr=1.0,
                         fused_linear=fused_linear)
    split = make_trainer(tmp_path / "split", batch=2, accumulation=2, steps=1, optim="sgd", lr=1.0,
                         fused_linear=fused_linear)
    split_losses = recorded_losses(split)
    start = [p.detach().clone() for p in whole.model.parameters()]
    whole.train()
    split.train()
    assert len(split_losses) == 2
    moved = max(float((a - p.detach()).abs().max()) for a, p in zip(start, whole.model.parameters()))
    assert moved > 1e-3
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_unequal_vocabularies(tmp_path):
    """A teacher with a padded vocabulary: only the common columns count."""
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = DistillTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1, vocab=VOCAB + 16), args=args,
                             train_dataset=dataset(), data_collator=collate)
    trainer.train()
    assert trainer.state.global_step == 1


def test_batches_need_labels(tmp_path):
    trainer = make_trainer(tmp_path, batch=2, accumulation=1, steps=1)
    batch = collate([dataset()[0], dataset()[1]])
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


def test_loss_must_be_a_mean(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for loss in (trd_fast.DistillationLoss(reduction="sum"), trd_fast.DistillationLoss(return_per_token=True),
                 torch.nn.KLDivLoss()):
        with pytest.raises(ValueError, match="loss"):
            DistillTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1), args=args, loss=loss)


# ------------------------------------------------------------------------------------------------ fused_linear

LOSSES = {"forward_kl": dict(divergence="forward_kl"),
          "reverse_kl T=2": dict(divergence="reverse_kl", temperature=2.0),
          "jsd top_k clip": dict(divergence="jsd", beta=0.3, top_k=5, clip=0.5)}
PAIRS = [(arch, arch) for arch in ARCHITECTURES] + [("llama", "gemma2 softcap")]


def loss_and_gradients(trainer, batch, fused_linear):
    """compute_loss on `batch` by one path, and the gradient of every student parameter."""
    trainer.fused_linear = fused_linear
    trainer.model.zero_grad()
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    loss.backward()
    return loss.detach(), outputs, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("options", LOSSES)
@pytest.mark.parametrize("student,teacher", PAIRS, ids=lambda a: a.replace(" ", "-"))
def test_fused_linear_gives_the_logits_path_loss(tmp_path, student, teacher, options):
    """The same loss and student gradients from hidden states as from logits: each architecture's LM head
    (bias, logit scale, final softcap) read right; a wider teacher with a padded vocabulary (the common
    columns count)."""
    wider = student != teacher
    trainer = make_trainer(tmp_path, batch=2, accumulation=1, steps=1, loss=trd_fast.DistillationLoss(**LOSSES[options]),
                           student=tiny_model(student, 0),
                           teacher=tiny_model(teacher, 1, vocab=VOCAB + 16 if wider else VOCAB, width=48 if wider else 32))
    batch = collate([dataset()[i] for i in (1, 3)])
    loss, outputs, grads = loss_and_gradients(trainer, batch, fused_linear=False)
    fused_loss, fused_outputs, fused_grads = loss_and_gradients(trainer, batch, fused_linear=True)
    assert loss > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert outputs.logits.shape[-1] == VOCAB and "logits" not in fused_outputs
    assert fused_outputs.last_hidden_state.shape == (*batch["input_ids"].shape, 32)


def test_fused_linear_refuses_a_logit_transform_it_does_not_read(tmp_path):
    """A config that does not say what the model does (here: the scale changed after the model read it) is
    caught on the first batch, naming the model."""
    student = tiny_model("cohere logit_scale", 0)
    student.config.logit_scale = 1.0  # the model keeps multiplying by 0.25
    trainer = make_trainer(tmp_path, batch=2, accumulation=1, steps=1, fused_linear=True, student=student)
    batch = collate([dataset()[0], dataset()[1]])
    with pytest.raises(ValueError, match="model: its logits differ"):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="fused_linear"):
        make_trainer(tmp_path, batch=2, accumulation=1, steps=1, fused_linear="yes")


class Wrapper(torch.nn.Module):
    """A stand-in for DDP: forwards its inputs to the wrapped model."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def test_hidden_states_through_a_wrapper():
    """A wrapped student runs the wrapper's forward (its hooks see the step): the same final hidden states."""
    model = tiny_model("gemma2 softcap", 0)
    batch = collate([dataset()[0], dataset()[2]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    direct = final_hidden_states(model, inputs)
    wrapped = final_hidden_states(model, inputs, wrapper=Wrapper(model))
    assert direct.shape == (*inputs["input_ids"].shape, 32)
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=0)
