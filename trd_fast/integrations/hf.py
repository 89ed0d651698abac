"""Distillation with a plain `transformers.Trainer`: DistillTrainer swaps the cross-entropy for DistillationLoss.

    trainer = DistillTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                             train_dataset=dataset, data_collator=collator,
                             loss=trd_fast.DistillationLoss(divergence="forward_kl"),
                             fused_linear=True)   # hidden states in: neither model forms its logits
    trainer.train()

Batches are what a causal-LM Trainer already gets: input_ids, attention_mask and labels (-100 = not trained).
Logits at position t predict token t + 1 (the shift HF's causal-LM loss makes), so position t is trained
where labels[t + 1] != -100, and the student and teacher logits are compared as `logits[:, :-1]` views (no
copy). Normalisation: the divergence summed over this micro-batch is divided by `num_items_in_batch`, the
Trainer's count of trained positions (labels[..., 1:] != -100) in the whole accumulated batch — across
processes too with `average_tokens_across_devices` — so gradient accumulation gives the update of one large
batch. Where the Trainer gives no count (evaluation) it is divided by this micro-batch's count.
With fused_linear=True both models run their backbones and the loss is fused_linear_distillation_loss on
their final hidden states [:, :-1] and LM heads (lm_head.py: output embedding, bias, logit scale and final
softcap from the config), with the same options, weights and normaliser: the same loss, without [B, T, V]
logits. The first batch checks, on its first sequence, that each model's own logits are the ones its head
implies (ValueError naming the model if not: an architecture whose logit transform is not read).
Tested with transformers 5.24. It relies on Trainer.compute_loss receiving num_items_in_batch and on the
Trainer's model_accepts_loss_kwargs rule for gradient-accumulation scaling.
"""

from __future__ import annotations

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutput

from trd_fast.constants import IGNORE_INDEX
from trd_fast.dependencies import check_version
from trd_fast.heads import check_lm_head, final_hidden_states, lm_head
from trd_fast.losses import DistillationLoss
from trd_fast.ops import fused_linear_distillation_loss

check_version("transformers", transformers.__version__, "trd_fast.integrations.hf")

REMEDY = "train on logits instead (fused_linear=False)"  # what a model whose head cannot be fused can do


class DistillTrainer(transformers.Trainer):
    """transformers.Trainer training `model` towards a frozen `teacher_model` with a DistillationLoss.

    teacher_model: a causal LM with the student's tokenizer (vocabularies may differ in padding: only the
    common columns count), moved to the Trainer's device, put in eval mode and frozen. loss: a
    DistillationLoss with reduction="mean" (default DistillationLoss(): forward KL, temperature 1). fused_linear:
    compute it from both models' final hidden states and LM heads (no logits; its inplace_backward is moot);
    compute_loss's outputs then hold the student's final hidden states, not logits. Every other argument is
    transformers.Trainer's.
    """

    def __init__(self, *args, teacher_model, loss: DistillationLoss | None = None, fused_linear: bool = False,
                 **kwargs):
        loss = DistillationLoss() if loss is None else loss
        if not isinstance(loss, DistillationLoss):
            raise ValueError(f"loss: expected a trd_fast.DistillationLoss, got {type(loss).__name__}")
        if loss.options.reduction != "mean" or loss.return_per_token:
            raise ValueError("loss: DistillTrainer normalises the loss itself; use reduction='mean' and "
                             "return_per_token=False")
        if not isinstance(fused_linear, bool):
            raise ValueError(f"fused_linear: expected a bool, got {fused_linear!r}")
        super().__init__(*args, **kwargs)
        self.distillation_loss = loss
        self.fused_linear = fused_linear
        self._heads_checked = False
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
        weight = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts token t + 1
        normalizer = weight.sum() if num_items_in_batch is None else num_items_in_batch
        if self.fused_linear:
            loss, outputs = self._hidden_state_loss(model, inputs, weight, normalizer)
        else:
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**inputs).logits
            loss = self.distillation_loss(outputs.logits[:, :-1], teacher_logits[:, :-1], weight=weight,
                                          normalizer=normalizer)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages the gradients
        return (loss, outputs) if return_outputs else loss

    def _hidden_state_loss(self, model, inputs, weight, normalizer):
        """(loss, outputs) of the fused_linear path: the loss of the logits path, from hidden states."""
        student = self.accelerator.unwrap_model(model)
        student_head, teacher_head = lm_head(student, "model"), lm_head(self.teacher_model, "teacher_model")
        if not self._heads_checked:
            check_lm_head(student, student_head, inputs, "model", remedy=REMEDY)
            check_lm_head(self.teacher_model, teacher_head, inputs, "teacher_model", remedy=REMEDY)
            self._heads_checked = True
        hidden = final_hidden_states(student, inputs, wrapper=model)  # [B, T, H_s]
        with torch.no_grad():
            teacher_hidden = final_hidden_states(self.teacher_model, inputs)  # [B, T, H_t]
        o = self.distillation_loss.options
        loss = fused_linear_distillation_loss(
            hidden[:, :-1], student_head.weight, teacher_hidden[:, :-1], teacher_head.weight,
            student_bias=student_head.bias, teacher_bias=teacher_head.bias,
            student_logit_scale=student_head.logit_scale, teacher_logit_scale=teacher_head.logit_scale,
            student_softcap=student_head.softcap, teacher_softcap=teacher_head.softcap, divergence=o.divergence,
            beta=o.beta, temperature=o.temperature, top_k=o.top_k, clip=o.clip, weight=weight,
            normalizer=normalizer, backend=self.distillation_loss.backend)
        return loss, BaseModelOutput(last_hidden_state=hidden)
