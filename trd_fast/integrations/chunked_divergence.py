"""TRL's DistillationTrainer loss (`trl.trainer.distillation_trainer._chunked_divergence_loss`) on trd_fast's
fused linear op: the same signature, values and gradients, and no [N, V] logits of either model.

Per trained position (completion_mask != 0), with the implied logits z = c tanh(a (h W^T + b) / c) of each model
(a its logit scale, c its final softcap, no tanh without one), p = softmax(z_s / T), q = softmax(z_t / T):
  beta == 0 -> KL(q || p);  beta == 1 -> KL(p || q);
  otherwise  -> beta KL(q || M) + (1 - beta) KL(p || M),  M = (1 - beta) p + beta q,
which is `fused_linear_distillation_loss(divergence="jsd", beta=beta, ...)`. The loss is the sum over trained
positions divided by num_items_in_batch, or by max(trained positions, 1) without it. TRL's function also
returns the student's summed entropy H(p) over the trained positions (a logged metric, no gradient): here it is
log V - KL(p || uniform), the reverse KL from a uniform teacher, computed by the same op (one more forward
projection of the student, no logits). Gradients reach the student's hidden states, LM-head weight and bias.
"""

from __future__ import annotations

import math

import torch

from trd_fast.ops import fused_linear_distillation_loss

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: no sharded heads
    DTensor = ()


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                            teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                            student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0, *, backend=None):
    """Drop-in for TRL's `_chunked_divergence_loss`: (loss, entropy_sum, n_valid), all 0-d, fp32 / int64.

    student_hidden_states [B, K, H_s] (gradient), teacher_hidden_states [B, K, H_t], LM heads [V_s, H_s] and
    [V_t, H_t] (biases [V]), completion_mask [B, K] (nonzero = trained). backend: trd_fast's (None: auto).
    Bad arguments raise ValueError naming them (fused_linear_distillation_loss's checks).
    """
    student_lm_head_weight, student_lm_head_bias = _full_head(student_lm_head_weight, student_lm_head_bias,
                                                              student_hidden_states.dtype)
    teacher_lm_head_weight, teacher_lm_head_bias = _full_head(teacher_lm_head_weight, teacher_lm_head_bias,
                                                              teacher_hidden_states.dtype)
    trained = completion_mask.reshape(-1) != 0  # [B * K]
    n_valid = trained.sum()
    index = trained.nonzero()[:, 0]  # [n]: one host sync for both sides
    student = student_hidden_states.reshape(-1, student_hidden_states.shape[-1]).index_select(0, index)  # [n, H_s]
    teacher = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]).index_select(0, index)  # [n, H_t]
    total = fused_linear_distillation_loss(
        student, student_lm_head_weight, teacher, teacher_lm_head_weight, student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping, divergence="jsd", beta=beta, temperature=temperature,
        reduction="sum", backend=backend)
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    with torch.no_grad():
        entropy_sum = student_entropy_sum(student, student_lm_head_weight, student_lm_head_bias,
                                          student_logit_scale, student_final_logit_softcapping, temperature,
                                          backend)
    return loss, entropy_sum, n_valid


def student_entropy_sum(hidden, weight, bias, logit_scale, softcap, temperature, backend):
    """sum over rows of H(softmax(z / T)) for z the logits implied by hidden [n, H] and the head weight [V, H]:
    log V - KL(p || uniform), the uniform teacher being a zero head of width 1. fp32, 0-d."""
    vocab = weight.shape[0]
    zero_hidden = hidden.new_zeros(hidden.shape[0], 1)  # [n, 1]
    zero_head = weight.new_zeros(vocab, 1)  # [V, 1]: teacher logits 0 everywhere
    from_uniform = fused_linear_distillation_loss(
        hidden.detach(), weight.detach(), zero_hidden, zero_head,
        student_bias=None if bias is None else bias.detach(), student_logit_scale=logit_scale,
        student_softcap=softcap, divergence="reverse_kl", temperature=temperature, reduction="sum",
        backend=backend)
    return hidden.shape[0] * math.log(vocab) - from_uniform


def _full_head(weight, bias, dtype):
    """An LM head sharded as a DTensor (FSDP2) gathered once, in the hidden states' dtype (its mixed-precision
    compute dtype); a plain tensor is returned as it is."""
    if not isinstance(weight, DTensor):
        return weight, bias
    return weight.full_tensor().to(dtype), None if bias is None else bias.full_tensor()
