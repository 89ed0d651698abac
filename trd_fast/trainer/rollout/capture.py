"""What a runner keeps of each position it predicts, as the training target of the token there: the model's final
hidden state (the default: the loss applies the LM head itself, so no [positions, V] tensor is ever stored), or
its top-k log-probs (a SparseTeacher row), taken from the logits row that sampling forms anyway, or from the
hidden states through the head in row blocks where no logits exist (scoring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from trd_fast import SparseTeacher
from trd_fast.heads import LMHead

Target = Tensor | SparseTeacher  # per position: hidden states [n, H] (model dtype), or top-k log-probs [n, k]

LOGIT_TEMPORARIES = 3  # fp32 [R, V] tensors alive at once while a block's logits are reduced (logits, exp, select)


@dataclass(frozen=True)
class Capture:
    top_k: int = 0                # 0: keep the final hidden state; k > 0: the top-k log-probs (T = 1) instead
    columns: int | None = None    # top_k: ids it may keep are below this (the student's vocabulary); None: all
    budget_bytes: int = 1 << 30   # bytes of the logit blocks formed from hidden states (row_blocks)

    def parts(self, hidden: Tensor, logits: Tensor | None, head: LMHead) -> tuple[Tensor, ...]:
        """What is kept of positions [A]: (hidden [A, H],) or (ids [A, k] int64, logprobs [A, k] fp32) from the
        logits [A, V] (None: formed from hidden through `head`, in row blocks)."""
        if not self.top_k:
            return (hidden,)
        if logits is not None:
            return self._top_k(logits)
        ids, logprobs = zip(*(self._top_k(head.logits(hidden[block])) for block in
                              row_blocks(len(hidden), head.weight.shape[0], self.budget_bytes)))
        return torch.cat(ids), torch.cat(logprobs)

    def target(self, parts: Sequence[Tensor]) -> Target:
        """The target of a row's positions from their kept parts (each [n, *])."""
        return parts[0] if not self.top_k else SparseTeacher(parts[0], parts[1])

    def _top_k(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        columns = logits.shape[-1] if self.columns is None else min(self.columns, logits.shape[-1])
        values, ids = torch.log_softmax(logits.float(), dim=-1)[:, :columns].topk(min(self.top_k, columns), dim=-1)
        return ids, values                                                                      # [A, k] each


def concat_targets(targets: Sequence[Target]) -> Target:
    """The targets of several rows as one, rows in order."""
    if isinstance(targets[0], SparseTeacher):
        return SparseTeacher(torch.cat([t.ids for t in targets]), torch.cat([t.logprobs for t in targets]))
    return torch.cat(list(targets))


def row_blocks(rows: int, vocab: int, budget_bytes: int) -> list[slice]:
    """Slices of `rows` positions whose fp32 logit blocks [R, vocab] (with their temporaries) fit `budget_bytes`
    (at least one row per block; one empty block for no rows, so a per-block result keeps its shape)."""
    size = max(1, budget_bytes // (LOGIT_TEMPORARIES * 4 * max(vocab, 1)))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)] or [slice(0, 0)]


def map_logits(head: LMHead, hidden: Tensor, fn: Callable[[Tensor, slice], Tensor], budget_bytes: int) -> Tensor:
    """fn(logits [R, V] fp32, rows) over row blocks of hidden [N, H] through `head`, concatenated: the per-row
    result of a function of full logits rows without ever holding [N, V]."""
    return torch.cat([fn(head.logits(hidden[block]), block)
                      for block in row_blocks(len(hidden), head.weight.shape[0], budget_bytes)])
