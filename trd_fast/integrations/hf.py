"""Distillation with a plain `transformers.Trainer`: DistillTrainer swaps the cross-entropy for DistillationLoss.

    trainer = DistillTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                             train_dataset=dataset, data_collator=collator,
                             loss=trd_fast.DistillationLoss(divergence="forward_kl"))
    trainer.train()

Batches are what a causal-LM Trainer already gets: input_ids, attention_mask and labels (-100 = not trained).
Logits at position t predict token t + 1 (the shift HF's causal-LM loss makes), so position t is trained
where labels[t + 1] != -100, and the student and teacher logits are compared as `logits[:, :-1]` views (no
copy). Normalisation: the divergence summed over this micro-batch is divided by `num_items_in_batch`, the
Trainer's count of trained positions (labels[..., 1:] != -100) in the whole accumulated batch — across
processes too with `average_tokens_across_devices` — so gradient accumulation gives the update of one large
batch. Where the Trainer gives no count (evaluation) it is divided by this micro-batch's count.
Tested with transformers 5.24. It relies on Trainer.compute_loss receiving num_items_in_batch and on the
Trainer's model_accepts_loss_kwargs rule for gradient-accumulation scaling.
"""

from __future__ import annotations

import torch
import transformers

from trd_fast.dependencies import check_version
from trd_fast.losses import DistillationLoss

check_version("transformers", transformers.__version__, "trd_fast.integrations.hf")

IGNORE_INDEX = -100


class DistillTrainer(transformers.Trainer):
    """transformers.Trainer training `model` towards a frozen `teacher_model` with a DistillationLoss.

    teacher_model: a causal LM with the student's tokenizer (vocabularies may differ in padding: only the
    common columns count), moved to the Trainer's device, put in eval mode and frozen. loss: a
    DistillationLoss with reduction="mean" (default DistillationLoss(): forward KL, temperature 1). Every other
    argument is transformers.Trainer's.
    """

    def __init__(self, *args, teacher_model, loss: DistillationLoss | None = None, **kwargs):
        loss = DistillationLoss() if loss is None else loss
        if not isinstance(loss, DistillationLoss):
            raise ValueError(f"loss: expected a trd_fast.DistillationLoss, got {type(loss).__name__}")
        if loss.options.reduction != "mean" or loss.return_per_token:
            raise ValueError("loss: DistillTrainer normalises the loss itself; use reduction='mean' and "
                             "return_per_token=False")
        super().__init__(*args, **kwargs)
        self.distillation_loss = loss
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        # The loss below is normalised by num_items_in_batch: this makes the Trainer count it for every model
        # (over labels[..., 1:], our shift) and not divide the loss by the accumulation steps a second time.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError(f"DistillTrainer: a batch needs 'labels' (-100 = not trained); got {sorted(inputs)}")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**inputs).logits
        weight = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts token t + 1
        normalizer = weight.sum() if num_items_in_batch is None else num_items_in_batch
        loss = self.distillation_loss(outputs.logits[:, :-1], teacher_logits[:, :-1], weight=weight,
                                      normalizer=normalizer)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages the gradients
        return (loss, outputs) if return_outputs else loss
