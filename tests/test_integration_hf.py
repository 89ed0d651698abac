"""DistillTrainer: distillation with a real transformers.Trainer and DistillationLoss."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import trd_fast
from trd_fast.integrations import DistillTrainer

VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(seed, vocab=VOCAB):
    """A 2-layer Llama with random weights, spread wide enough that student and teacher disagree."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


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


def make_trainer(tmp_path, *, batch, accumulation, steps, loss=None, optim="adamw_torch", lr=1e-2):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             optim=optim, lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             remove_unused_columns=False)
    return DistillTrainer(model=tiny_lm(0), teacher_model=tiny_lm(1), args=args, train_dataset=dataset(),
                          data_collator=collate, loss=loss)


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


def test_gradient_accumulation_gives_the_large_batch_update(tmp_path):
    """One SGD step over 4 rows: one batch of 4, or 2 micro-batches of 2 accumulated. num_items_in_batch
    normalisation makes both the mean over all 4 rows' trained positions, so the weights agree."""
    whole = make_trainer(tmp_path / "whole", batch=4, accumulation=1, steps=1, optim="sgd", lr=1.0)
    split = make_trainer(tmp_path / "split", batch=2, accumulation=2, steps=1, optim="sgd", lr=1.0)
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
