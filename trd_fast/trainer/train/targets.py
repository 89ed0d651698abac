"""Teacher targets of one step: the teacher's raw logits for every trained token, dense or top-k sparse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import trd_fast


@dataclass
class Targets:
    dense: Tensor | None                 # [N, V_t] fp32 raw teacher logits, one row per trained token
    sparse: trd_fast.SparseTeacher | None  # or the teacher's top-k log-probs per trained token ([N, k])

    @property
    def is_sparse(self) -> bool:
        return self.sparse is not None

    def rows(self, index: slice) -> Tensor | trd_fast.SparseTeacher:
        if self.dense is not None:
            return self.dense[index]
        return trd_fast.SparseTeacher(self.sparse.ids[index], self.sparse.logprobs[index])


def build_targets(rows: list[Tensor], *, budget_mb: float, top_k: int, student_vocab: int) -> Targets:
    """Concatenate per-row teacher logits ([len_b, V] each) into dense targets when they fit in `budget_mb`,
    else keep each token's teacher top-k log-probs among the ids the student has (a SparseTeacher)."""
    count = sum(r.shape[0] for r in rows)
    vocab = rows[0].shape[-1] if rows else 0
    if count * vocab * 4 <= budget_mb * 2**20:
        return Targets(dense=torch.cat(rows).float() if rows else torch.zeros(0, 0), sparse=None)
    common = min(vocab, student_vocab)
    k = min(top_k, common)
    ids, logprobs = [], []
    for r in rows:
        values, index = torch.log_softmax(r.float(), dim=-1)[:, :common].topk(k, dim=-1)   # [len_b, k]
        ids.append(index)
        logprobs.append(values)
    return Targets(dense=None, sparse=trd_fast.SparseTeacher(torch.cat(ids), torch.cat(logprobs)))
