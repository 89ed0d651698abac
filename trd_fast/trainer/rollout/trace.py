"""The tokens drawn for a set of rows, and the padded tensors they make at the end."""

from __future__ import annotations

import torch
from torch import Tensor


class Trace:
    """Each add appends tokens to the rows it names, at each row's own next positions: rows may advance by
    different amounts per forward (draft verification) and join or leave at any point."""

    def __init__(self, rows: int, device: torch.device):
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)   # [R] tokens drawn per row
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)   # [R] stopped on EOS
        self._adds: list[tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...] | None]] = []

    def add(self, rows: Tensor, tokens: Tensor, logprobs: Tensor, kept: tuple[Tensor, ...] | None,
            eos_id: int) -> None:
        """Rows [A] (distinct) drew tokens [A] with log-probs [A]; `kept`: what the capture keeps of their
        positions (rollout/capture.py; tensors [A, *] each), or None. The tensors are kept as they are: no
        host sync and no copy per decoded token."""
        self._adds.append((rows, self.lengths[rows], tokens, logprobs, kept))  # the index makes positions a copy
        self.lengths[rows] += 1
        self.finished[rows] = tokens == eos_id

    def add_runs(self, rows: Tensor, tokens: Tensor, logprobs: Tensor, kept: tuple[Tensor, ...] | None,
                 counts: Tensor, eos_id: int) -> None:
        """Rows [A] (distinct) drew runs of tokens: row i its first counts[i] >= 1 of tokens [A, W], with
        log-probs [A, W]; `kept`: what the capture keeps of their positions (tensors [A, W, *] each), or None."""
        at = (torch.arange(tokens.shape[1], device=tokens.device) < counts[:, None]).nonzero()  # [N, 2] (i, j)
        i, j = at[:, 0], at[:, 1]
        self._adds.append((rows[i], self.lengths[rows][i] + j, tokens[i, j], logprobs[i, j],
                           None if kept is None else tuple(part[i, j] for part in kept)))
        self.lengths[rows] += counts
        self.finished[rows] = tokens.gather(1, (counts - 1)[:, None])[:, 0] == eos_id

    @property
    def width(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def tokens(self, pad_id: int) -> Tensor:
        """[R, N] int64, pad_id after each row's end (N: the longest row)."""
        out = torch.full((len(self.lengths), self.width), pad_id, dtype=torch.int64, device=self.lengths.device)
        for rows, positions, tokens, _, _ in self._adds:
            out[rows, positions] = tokens
        return out

    def logprobs(self) -> Tensor:
        """[R, N] fp32, 0 after each row's end."""
        out = torch.zeros(len(self.lengths), self.width, device=self.lengths.device)
        for rows, positions, _, logprobs, _ in self._adds:
            out[rows, positions] = logprobs
        return out

    def take_kept(self) -> tuple[Tensor, ...]:
        """What the adds kept, each part as [R, N, *] (its dtype; 0 after each row's end; () when nothing was
        kept); the adds' own references are released on the way."""
        first = next((kept for *_, kept in self._adds if kept is not None), ())
        out = tuple(torch.zeros(len(self.lengths), self.width, *part.shape[1:], dtype=part.dtype,
                                device=self.lengths.device) for part in first)
        for i, (rows, positions, tokens, logprobs, kept) in enumerate(self._adds):
            for whole, part in zip(out, kept or ()):
                whole[rows, positions] = part
            self._adds[i] = (rows, positions, tokens, logprobs, None)
        return out
