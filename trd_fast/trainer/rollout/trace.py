"""The tokens sampled for a set of rows, step by step, and the padded tensors they make at the end."""

from __future__ import annotations

import torch
from torch import Tensor


class Trace:
    """Step i holds the rows still going at that step; a row leaves the steps after it stopped."""

    def __init__(self, rows: int, device: torch.device):
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)   # [R] tokens sampled per row
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)   # [R] stopped on EOS
        self._steps: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []

    def add(self, rows: Tensor, tokens: Tensor, logprobs: Tensor, logits: Tensor | None, eos_id: int) -> None:
        """One step: rows [A] drew tokens [A] with log-probs [A] from raw logits [A, V] (None: not kept)."""
        self._steps.append((rows, tokens, logprobs, logits))
        self.lengths[rows] += 1
        self.finished[rows] = tokens == eos_id

    def tokens(self, pad_id: int) -> Tensor:
        """[R, N] int64, pad_id after each row's end."""
        out = torch.full((len(self.lengths), len(self._steps)), pad_id, dtype=torch.int64,
                         device=self.lengths.device)
        for i, (rows, tokens, _, _) in enumerate(self._steps):
            out[rows, i] = tokens
        return out

    def logprobs(self) -> Tensor:
        """[R, N] fp32, 0 after each row's end."""
        out = torch.zeros(len(self.lengths), len(self._steps), device=self.lengths.device)
        for i, (rows, _, logprobs, _) in enumerate(self._steps):
            out[rows, i] = logprobs
        return out

    def take_logits(self, vocab: int) -> Tensor:
        """[R, N, V] fp32 raw logits, 0 after each row's end; the steps' own copies are released on the way."""
        out = torch.zeros(len(self.lengths), len(self._steps), vocab, device=self.lengths.device)
        for i, (rows, tokens, logprobs, logits) in enumerate(self._steps):
            out[rows, i] = logits
            self._steps[i] = (rows, tokens, logprobs, None)
        return out
