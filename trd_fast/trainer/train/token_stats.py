"""Per-token diagnostics of the training step, taken over the loss's own support (the common vocabulary, or
the teacher's top-k ids), so that columns a padded vocabulary adds never count. They stream over row blocks of
the hidden states: logits exist one block at a time, never [N, V]."""

from __future__ import annotations

import torch
from torch import Tensor

import trd_fast
from trd_fast.heads import LMHead
from trd_fast.reference import divergence_support
from trd_fast.trainer.rollout.capture import row_blocks


@torch.no_grad()
def support_stats(student_hidden: Tensor, student_head: LMHead, teacher: Tensor | trd_fast.SparseTeacher,
                  teacher_head: LMHead, *, top_k: int | None, epistemic_ids: Tensor,
                  budget_bytes: int) -> tuple[Tensor, Tensor]:
    """At T = 1, over the columns the loss uses (`trd_fast.reference.divergence_support` with the loss's
    `top_k`): the student's entropy -sum p log p and the teacher's probability mass on `epistemic_ids` (int64
    token ids), per trained token. student_hidden [N, H_s] through student_head; teacher: hidden states
    [N, H_t] through teacher_head, or a SparseTeacher [N, k]. Logit blocks of at most `budget_bytes`; the
    teacher's logits are formed only where its mass or its top-k support is needed. Returns two [N] fp32
    tensors."""
    sparse = isinstance(teacher, trd_fast.SparseTeacher)
    columns = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    needs_teacher = sparse or top_k is not None or len(epistemic_ids) > 0
    entropy, mass = [], []
    for rows in row_blocks(len(student_hidden), student_head.weight.shape[0] + teacher_head.weight.shape[0],
                           budget_bytes):
        student = student_head.logits(student_hidden[rows].detach())                           # [R, V_s]
        if not needs_teacher:
            entropy.append(_entropy(student[:, :columns]))
            mass.append(student.new_zeros(len(student)))
            continue
        block = (trd_fast.SparseTeacher(teacher.ids[rows], teacher.logprobs[rows]) if sparse
                 else teacher_head.logits(teacher[rows]))                                      # [R, V_t] or [R, k]
        student_sub, teacher_sub, ids = divergence_support(student, block, top_k=top_k)        # [R, w] each
        entropy.append(_entropy(student_sub))
        support = ids if ids is not None else torch.arange(student_sub.shape[-1], device=student.device)
        hit = torch.isin(support, epistemic_ids.to(support.device))
        mass.append((torch.softmax(teacher_sub.float(), dim=-1) * hit).sum(-1))
    return torch.cat(entropy), torch.cat(mass)


def _entropy(logits: Tensor) -> Tensor:
    """[R, w] logits -> [R] entropy of their softmax (fp32)."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)
