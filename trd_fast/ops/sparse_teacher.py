"""A teacher known only on its top-k ids per position (e.g. a server's prompt log-probs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trd_fast.ops import checks


@dataclass(frozen=True)
class SparseTeacher:
    """Teacher targets on k ids per position; the support of the divergence is exactly these ids.

    q = softmax(logprobs / T) over the ids (equal to dense top_k=k when the log-probs were produced at T=1);
    the student is renormalized over the same ids.
    """

    ids: torch.Tensor  # [..., k] integer token ids, distinct per position, -1 marks an empty slot
    logprobs: torch.Tensor  # [..., k] float log-probabilities (or logits) of those ids

    def __post_init__(self):
        checks.integer_tensor("SparseTeacher.ids", self.ids)
        if not isinstance(self.logprobs, torch.Tensor) or not self.logprobs.dtype.is_floating_point:
            raise ValueError(f"SparseTeacher.logprobs: expected a float tensor, got {checks.describe(self.logprobs)}")
        if self.ids.dim() == 0 or self.ids.shape != self.logprobs.shape:
            raise ValueError(f"SparseTeacher: ids {tuple(self.ids.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must have the same shape [..., k]")
        if self.ids.device != self.logprobs.device:
            raise ValueError(f"SparseTeacher: ids on {self.ids.device} but logprobs on {self.logprobs.device}")
        if self.ids.dtype != torch.int64:
            object.__setattr__(self, "ids", self.ids.to(torch.int64))

    @property
    def shape(self) -> torch.Size:
        return self.logprobs.shape

    @property
    def device(self) -> torch.device:
        return self.logprobs.device

    def detach(self) -> "SparseTeacher":
        return SparseTeacher(self.ids, self.logprobs.detach())
