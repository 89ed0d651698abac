"""nn.Module wrappers of the fused losses."""

from __future__ import annotations

import torch

from trd_fast.ops import LossOptions, distillation_loss, fused_linear_distillation_loss
from trd_fast.ops.fused_linear import head_options


class DistillationLoss(torch.nn.Module):
    """distillation_loss with its options fixed at construction (validated there).

    loss = DistillationLoss(divergence="reverse_kl", top_k=32)(student_logits, teacher_logits, weight=mask)
    """

    def __init__(self, divergence="forward_kl", beta=0.5, temperature=1.0, top_k=None, clip=None,
                 reduction="mean", return_per_token=False, inplace_backward=False, backend=None):
        super().__init__()
        self.options = LossOptions(divergence, beta, temperature, top_k, clip, reduction)
        self.return_per_token = return_per_token
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, student_logits, teacher_logits, weight=None, normalizer=None):
        o = self.options
        return distillation_loss(student_logits, teacher_logits, divergence=o.divergence, beta=o.beta,
                                 temperature=o.temperature, top_k=o.top_k, clip=o.clip, weight=weight,
                                 normalizer=normalizer, reduction=o.reduction,
                                 return_per_token=self.return_per_token,
                                 inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())


class FusedLinearDistillationLoss(torch.nn.Module):
    """fused_linear_distillation_loss with its options, logit scales and softcaps fixed at construction.

    loss = FusedLinearDistillationLoss(divergence="jsd", beta=0.5)(student_hidden, student_head.weight,
                                                                  teacher_hidden, teacher_head.weight, weight=mask)
    """

    def __init__(self, divergence="forward_kl", beta=0.5, temperature=1.0, top_k=None, clip=None,
                 reduction="mean", return_per_token=False, student_logit_scale=1.0, teacher_logit_scale=1.0,
                 student_softcap=None, teacher_softcap=None, backend=None):
        super().__init__()
        self.options = LossOptions(divergence, beta, temperature, top_k, clip, reduction)
        self.heads = dict(zip(("student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap"),
                              head_options(student_logit_scale, teacher_logit_scale, student_softcap,
                                           teacher_softcap)))
        self.return_per_token = return_per_token
        self.backend = backend

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None, weight=None,
                normalizer=None, student_bias=None, teacher_bias=None):
        o = self.options
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, **self.heads, divergence=o.divergence, beta=o.beta,
            temperature=o.temperature, top_k=o.top_k, clip=o.clip, weight=weight, normalizer=normalizer,
            reduction=o.reduction, return_per_token=self.return_per_token, backend=self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**vars(self.options), **self.heads}.items())
