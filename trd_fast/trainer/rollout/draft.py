"""Draft-verified generation: the model checks a draft of its next tokens, taken from a sequence it is expected
to mostly copy (the student's rollout y_o, for the teacher's rewrite), several tokens per forward, and keeps
exactly what plain decoding would produce.

Each forward feeds, per row, its pending token (its prompt, on the first forward) and a draft d_0 .. d_{m-1}
of at most D tokens; slot j of the output predicts the token after d_{j-1} (slot 0: after the pending token).
Verification walks the slots in order:
  greedy (T = 0)  accept d_j while it is the argmax of slot j (over the same ids `sample` draws from);
  sampled         accept d_j with probability p_j(d_j), where p_j is slot j's sampling distribution
                  (softmax(logits / T) after top-k and top-p, renormalised); at the first rejection draw
                  from p_j with d_j removed, renormalised.
The token after the accepted prefix d_0 .. d_{a-1} comes from slot a: that corrected draw, or a plain draw
when all m were accepted. Each position then has law p_j exactly: P(d_j) = p_j(d_j), and for y != d_j
P(y) = (1 - p_j(d_j)) p_j(y) / (1 - p_j(d_j)) = p_j(y); the draft depends only on tokens already generated.
A forward thus yields a + 1 tokens, and their captured hidden states are its slots 0 .. a: those a plain
forward over (context, output) gives, up to the rounding of a multi-token forward. The rejected slots are
masked out of the KV cache and the cache is cut back to the longest kept block, so no later token sees them.

The draft pointer: a row copies its source from an aligned position that moves on with every accepted or
matching token. At a token that differs from the source the pointer first guesses a substitution: it moves
past the replaced source token. When the very next token differs too, the guess failed and the pointer
re-synchronises on the last `match` generated tokens (prompt-lookup style): just past their occurrence in
the source nearest to the guessed position (ties: the later one), or, when they occur nowhere, it keeps the
guess. The draft is empty once the pointer has run past the source. (Measured on the shipped task, where a
wrong intermediate value changes every later step: an empty draft when nothing matches took up to twice the
forwards of the substitution guess.) Drafts stop before the source's first EOS (the plain draw after a fully
accepted draft ends the row instead) and before the row's token budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

import trd_fast

from trd_fast.trainer.rollout.kv_cache import CachedBatch
from trd_fast.trainer.rollout.sampling import SamplingConfig, filtered_weights, greedy, inverse_cdf, uniform
from trd_fast.trainer.rollout.trace import Trace

if TYPE_CHECKING:
    from trd_fast.trainer.rollout.generation import Runner


@dataclass(frozen=True)
class DraftConfig:
    tokens: int = 3    # D: draft tokens verified per forward and row; 0: no drafting
    match: int = 3     # generated tokens matched in the source to re-synchronise the pointer after a mismatch

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.match < 1:
            raise ValueError(f"match must be >= 1, got {self.match}")


class Drafter:
    """Per row, a draft source and an aligned pointer into it (see the module docstring)."""

    def __init__(self, config: DraftConfig, sources: Sequence[Tensor], eos_id: int,
                 prefixes: Sequence[int] | None = None):
        """sources: per row 1-D int64 tokens to draft from; prefixes: per row, how many of its source's first
        tokens the row has already generated unchanged (default 0)."""
        prefixes = [0] * len(sources) if prefixes is None else [int(k) for k in prefixes]
        if len(prefixes) != len(sources):
            raise ValueError(f"prefixes: {len(prefixes)} for {len(sources)} sources")
        self.config = config
        self._sources = []
        for source in sources:
            tokens = source.tolist()
            self._sources.append(tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens)
        self._generated = [source[:k] for source, k in zip(self._sources, prefixes)]
        self._position = prefixes                       # source position aligned with the row's next token
        self._guessed = [False] * len(sources)          # that position is an unconfirmed substitution guess
        self._ngrams: list[dict[tuple[int, ...], list[int]] | None] = [None] * len(sources)

    def __len__(self) -> int:
        return len(self._sources)

    def propose(self, row: int, room: int) -> list[int]:
        """Up to min(D, room) source tokens from the row's pointer."""
        position = self._position[row]
        return self._sources[row][position:position + max(0, min(self.config.tokens, room))]

    def advance(self, row: int, tokens: Sequence[int], accepted: int) -> None:
        """The row generated `tokens`: the first `accepted` of its proposal, then one token of its own."""
        self._generated[row].extend(tokens)
        source, position = self._sources[row], self._position[row] + accepted
        confirmed = accepted > 0 or not self._guessed[row]
        guess = position + 1
        if position < len(source) and source[position] == tokens[accepted]:
            self._position[row], self._guessed[row] = guess, False
        elif confirmed:
            self._position[row], self._guessed[row] = guess, True
        else:
            ends = self._occurrences(row).get(tuple(self._generated[row][-self.config.match:]), ())
            self._position[row] = min(ends, key=lambda e: (abs(e - guess), -e)) if ends else guess
            self._guessed[row] = False

    def _occurrences(self, row: int) -> dict[tuple[int, ...], list[int]]:
        """The row's source n-grams (n = match) -> the positions just past each occurrence."""
        if self._ngrams[row] is None:
            n, source = self.config.match, self._sources[row]
            index: dict[tuple[int, ...], list[int]] = {}
            for end in range(n, len(source) + 1):
                index.setdefault(tuple(source[end - n:end]), []).append(end)
            self._ngrams[row] = index
        return self._ngrams[row]


def verify(logits: Tensor, drafts: Tensor, lengths: Tensor, sampling: SamplingConfig, generator: torch.Generator,
           vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Speculative acceptance of each row's draft (see the module docstring).

    logits [A, 1 + D, V] raw, slot j predicting the token after draft token j - 1; drafts [A, D] int64, row i's
    first lengths[i] valid (the rest ignored). Returns accepted [A] int64 (the length of the accepted prefix)
    and token [A] int64 (the token drawn at slot `accepted`). Sampled rows use D + 1 uniforms each from
    `generator`; greedy uses none.
    """
    rows, slots, vocab = logits.shape
    width = slots - 1
    valid = torch.arange(width, device=logits.device) < lengths[:, None]                  # [A, D]
    if sampling.temperature == 0:
        choice = greedy(logits.reshape(-1, vocab), vocab_size).view(rows, slots)           # [A, 1 + D]
        accepted = ((choice[:, :width] == drafts) & valid).cumprod(-1).sum(-1)
        return accepted, choice.gather(1, accepted[:, None])[:, 0]
    weights = filtered_weights(logits.reshape(-1, vocab), sampling, vocab_size).view(rows, slots, -1)  # [A, 1+D, V']
    inside = drafts < weights.shape[-1]                                                    # ids it can draw
    ids = torch.where(inside, drafts, 0)[..., None]                                        # [A, D, 1]
    chance = (weights[:, :width].gather(-1, ids)[..., 0] / weights[:, :width].sum(-1)).masked_fill(~inside, 0.0)
    u = uniform(rows * width, generator).to(logits.device).view(rows, width)
    accepted = ((u < chance) & valid).cumprod(-1).sum(-1)                                  # [A]
    final = weights[torch.arange(rows, device=logits.device), accepted]                    # [A, V']
    rejected = (accepted < lengths).nonzero()[:, 0]
    dropped = drafts[rejected, accepted[rejected]]
    keep = dropped < final.shape[-1]
    final[rejected[keep], dropped[keep]] = 0.0                                             # p with d removed
    return accepted, inverse_cdf(final, uniform(rows, generator))


@torch.no_grad()
def verify_decode(runner: Runner, drafter: Drafter, *, rows: Sequence[int], heads: Sequence[Tensor],
                  history: Sequence[list[int]] | None, state: CachedBatch | None, trace: Trace, alive: Tensor,
                  budget: Tensor, sampling: SamplingConfig, generator: torch.Generator, capture: bool,
                  progress: str | None) -> None:
    """Generate for the alive rows (indices [A] into the trace and the drafter; `state` holds them in that order,
    None before their prompts) until each stops at EOS or at its budget (budget [R]: the trace length it may
    reach). Each forward feeds row i heads[i] (its prompt, or its pending token) and its draft, after
    history[i] (the token ids `state` holds for it; None: nothing). `rows[r]` is trace row r's ledger id; each
    forward is recorded in the ledger as it is fed, rejected draft tails included."""
    device = runner.device
    history = [list(h) for h in history] if history is not None else [[] for _ in heads]
    heads = list(heads)
    fed_heads = [h.tolist() for h in heads]
    bar = tqdm(desc=progress, disable=progress is None, leave=False)
    while len(alive):
        order = alive.tolist()
        room = (budget[alive] - trace.lengths[alive] - 1).tolist()          # tokens before the final draw
        proposals = [drafter.propose(i, r) for i, r in zip(order, room)]
        counts = [len(p) for p in proposals]
        width = max(counts)
        drafts = torch.tensor([p + [runner.pad_id] * (width - len(p)) for p in proposals], dtype=torch.int64,
                              device=device).view(len(order), width)       # [A, D]
        tails = torch.tensor([t for p in proposals for t in p], dtype=torch.int64, device=device).split(counts)
        hidden, state = runner.prefill([rows[i] for i in order], heads, tails, keep=width + 1, state=state,
                                       history=history, draft=True)         # [A, 1 + D, H]
        logits = runner.head.logits(hidden)                                  # [A, 1 + D, V]: the verified rows
        accepted, token = verify(logits, drafts, torch.tensor(counts, device=device), sampling, generator,
                                 runner.vocab_size)
        _record(runner, trace, alive, hidden, logits, drafts, accepted, token, capture)
        del logits
        taken, drawn = accepted.tolist(), token.tolist()
        runner.counters.accepted_tokens += sum(taken)
        for i, p, a, t in zip(order, proposals, taken, drawn):
            drafter.advance(i, p[:a] + [t], a)
        going = (token != runner.eos_id) & (trace.lengths[alive] < budget[alive])
        keep = going.nonzero()[:, 0]
        if len(keep):
            kept = keep.tolist()
            state = _drop_rejected(state, accepted, width, keep, longest=max(taken[i] for i in kept))
            history = [history[i] + fed_heads[i] + proposals[i][:taken[i]] for i in kept]
            fed_heads = [[drawn[i]] for i in kept]
            heads = list(token[keep].view(-1, 1).unbind(0))
        alive = alive[keep]
        bar.update(1)
    bar.close()


def _record(runner: Runner, trace: Trace, alive: Tensor, hidden: Tensor, logits: Tensor, drafts: Tensor,
            accepted: Tensor, token: Tensor, capture: bool) -> None:
    """Each alive row's accepted draft tokens, then its own token, into the trace with what the capture keeps of
    their slots (hidden states [A, 1 + D, H], logits [A, 1 + D, V])."""
    slots = torch.arange(logits.shape[1], device=logits.device)                        # [1 + D]
    padded = torch.cat([drafts, token[:, None]], dim=1)                                 # [A, 1 + D]
    tokens = torch.where(slots < accepted[:, None], padded, token[:, None])             # [A, 1 + D]
    kept = None
    if capture:
        flat = runner.capture.parts(hidden.flatten(0, 1), logits.flatten(0, 1), runner.head)
        kept = tuple(part.view(*tokens.shape, *part.shape[1:]) for part in flat)     # [A, 1 + D, *] each
    trace.add_runs(alive, tokens, trd_fast.token_logprobs(logits, tokens), kept, accepted + 1, runner.eos_id)


def _drop_rejected(state: CachedBatch, accepted: Tensor, width: int, keep: Tensor, *,
                   longest: int) -> CachedBatch:
    """The batch of rows `keep` with the rejected draft slots of the last forward (its last `width` columns)
    masked out, cut back to the longest kept block (`longest`: the most draft tokens a kept row accepted)."""
    start = state.mask.shape[1] - width
    kept = torch.arange(width, device=accepted.device) < accepted[:, None]                # [A, D]
    mask = torch.cat([state.mask[:, :start], state.mask[:, start:] & kept], dim=1)
    cut = CachedBatch(state.cache, mask).crop(start + longest)
    return cut if len(keep) == len(accepted) else cut.select(keep)
