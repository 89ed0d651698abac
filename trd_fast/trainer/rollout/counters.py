"""What one model did in one step: token counters, and a ledger of the sequences it was fed, which tells a
re-scoring forward (output the model already computed this step) from new work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class TokenCounters:
    prefill_tokens: int = 0    # non-pad tokens fed by multi-token forwards (prompts, scoring)
    decode_tokens: int = 0     # generated tokens fed back, one per row per decode forward
    draft_tokens: int = 0      # draft tokens fed after them (or after a prompt) to be verified
    accepted_tokens: int = 0   # of those, the ones the model's own draw kept (the others were rejected)
    forwards: int = 0          # forward passes
    rescore_forwards: int = 0  # forwards that fed at least one token whose output was already computed this step
    rescore_tokens: int = 0    # such tokens: same row, same preceding tokens, same token

    @property
    def acceptance(self) -> float:
        """The share of draft tokens accepted; NaN when none was drafted."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")


class Ledger:
    """Per row id, the token sequences the model has been fed this step (each one whole: context included).

    A token fed at position t of a sequence S was already computed when some recorded sequence starts with
    S[:t+1]; since that holds for every position below the longest common prefix with a recorded sequence, the
    re-scored tokens of a feed are the fed positions below that prefix length. The recorded sequences of a row
    are kept as a trie (nested dicts keyed by token id), so a feed costs one walk along its own length.

    A draft token is fed once, when it is verified: that is new work, not a re-score. A rejected draft token was
    fed too (its output computed, then discarded): the ledger keeps it on its own branch, the row's sequence up
    to it followed by the rejected draft tail, which is no part of the generated output; feeding that branch
    again would count as re-scoring, feeding the accepted path on past the branch point would not.
    """

    def __init__(self):
        self._fed: dict[int, dict] = {}                          # row id -> trie of its fed sequences
        self._last: dict[int, tuple[list[int], list[dict]]] = {}  # row id -> its last fed sequence, and the trie
                                                                  # node after each of its prefixes

    def feed(self, rows: Sequence[int], sequences: Sequence[list[int]], starts: Sequence[int]) -> list[int]:
        """Records that row rows[i] was fed sequences[i][starts[i]:] after sequences[i][:starts[i]] (token ids);
        returns the number of those tokens already fed before this call. All rows are checked before any is
        recorded, so two rows of one forward never count each other."""
        walks = [self._walk(row, seq, start) for row, seq, start in zip(rows, sequences, starts)]
        counts = [max(0, len(nodes) - 1 - start) for nodes, start in zip(walks, starts)]
        for row, seq, nodes in zip(rows, sequences, walks):
            node = nodes[-1]
            for token in seq[len(nodes) - 1:]:
                node = node.setdefault(token, {})
                nodes.append(node)
            self._last[row] = (seq, nodes)
        return counts

    def _walk(self, row: int, sequence: list[int], start: int) -> list[dict]:
        """The trie nodes along `sequence` from the root as far as the row's trie holds it (one more than the
        depth reached). A feed that continues the row's last one (the usual case: its first `start` tokens are
        a prefix of it) resumes from there instead of walking from the root."""
        last = self._last.get(row)
        if last is not None and start <= len(last[0]) and sequence[:start] == last[0][:start]:
            nodes = last[1][:start + 1]
        else:
            nodes = [self._fed.setdefault(row, {})]
        node = nodes[-1]
        for token in sequence[len(nodes) - 1:]:
            node = node.get(token)
            if node is None:
                break
            nodes.append(node)
        return nodes
