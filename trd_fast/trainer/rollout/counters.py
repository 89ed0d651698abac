"""What one model did in one step: token counters, and a ledger of the sequences it was fed, which tells a
re-scoring forward (output the model already computed this step) from new work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor


@dataclass
class TokenCounters:
    prefill_tokens: int = 0    # non-pad tokens fed by multi-token forwards (prompts, scoring)
    decode_tokens: int = 0     # non-pad tokens fed one per row per decode forward
    forwards: int = 0          # forward passes
    rescore_forwards: int = 0  # forwards that fed at least one token whose output was already computed this step
    rescore_tokens: int = 0    # such tokens: same row, same preceding tokens, same token


class Ledger:
    """Per row id, the token sequences the model has been fed this step (each one whole: context included).

    A token fed at position t of a sequence S was already computed when some recorded sequence starts with
    S[:t+1]; since that holds for every position below the longest common prefix with a recorded sequence, the
    re-scored tokens of a feed are the fed positions below that prefix length.
    """

    def __init__(self):
        self._fed: dict[int, list[Tensor]] = {}

    def feed(self, rows: Sequence[int], sequences: Sequence[Tensor], starts: Sequence[int]) -> list[int]:
        """Records that row rows[i] was fed sequences[i][starts[i]:] after sequences[i][:starts[i]]; returns the
        number of those tokens already fed before this call. All rows are checked before any is recorded, so
        two rows of one forward never count each other."""
        counts = [max(0, min(len(seq), self._longest_match(row, seq)) - start)
                  for row, seq, start in zip(rows, sequences, starts)]
        for row, seq in zip(rows, sequences):
            self._record(row, seq)
        return counts

    def _longest_match(self, row: int, sequence: Tensor) -> int:
        return max((_common_prefix(seen, sequence) for seen in self._fed.get(row, ())), default=0)

    def _record(self, row: int, sequence: Tensor) -> None:
        seen = self._fed.setdefault(row, [])
        if any(_common_prefix(s, sequence) == len(sequence) for s in seen):
            return  # already contained in a longer (or equal) recorded sequence
        seen[:] = [s for s in seen if _common_prefix(s, sequence) < len(s)] + [sequence]


def _common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n
