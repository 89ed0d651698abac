"""nn.Module wrappers of the fused losses."""

from __future__ import annotations

import torch

from trd_fast.ops import LossOptions, distillation_loss


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
