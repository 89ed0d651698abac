"""Per-token diagnostics of the training step, taken over the loss's own support (the common vocabulary, or
the teacher's top-k ids), so that columns a padded vocabulary adds never count."""

from __future__ import annotations

import torch
from torch import Tensor

import trd_fast
from trd_fast.reference import divergence_support


@torch.no_grad()
def support_stats(student_logits: Tensor, teacher: Tensor | trd_fast.SparseTeacher, *, top_k: int | None,
                  epistemic_ids: Tensor) -> tuple[Tensor, Tensor]:
    """At T = 1, over the columns the loss uses (`trd_fast.reference.divergence_support` with the loss's
    `top_k`): the student's entropy -sum p log p and the teacher's probability mass on `epistemic_ids` (int64
    token ids), per trained token. student_logits [N, V_s], teacher [N, V_t] logits or a SparseTeacher;
    returns two [N] fp32 tensors."""
    student, teacher_sub, ids = divergence_support(student_logits.float(), teacher, top_k=top_k)   # [N, w] each
    entropy = torch.special.entr(torch.softmax(student, dim=-1)).sum(-1)                            # [N]
    columns = ids if ids is not None else torch.arange(student.shape[-1], device=student.device)    # [N, w] or [w]
    hit = torch.isin(columns, epistemic_ids.to(columns.device))
    mass = (torch.softmax(teacher_sub.float(), dim=-1) * hit).sum(-1)                               # [N]
    return entropy, mass
