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
forwards of the substitution guess.) A substituted token is expected to be substituted again where the source
next holds it (a corrected value carried forward): that position is drafted, and matched, as the replacement; a
guess that fails takes its replacement with it. (Measured by bench.draft_replay on the shipped task, where a value
is reused once: carrying a replacement on to every later use took 1.5% more forwards summed over rows.) Drafts
stop before the source's first EOS (the plain draw after a fully accepted draft ends the row instead) and before
the row's token budget.

Once the pointer has run past the source (a rollout that stopped early leaves most of the rewrite undrafted),
the draft is looked up prompt-lookup style in the row's text, its context (the refine prompt) followed by what
it generated: the tokens that followed the latest earlier occurrence of its last `match` tokens, or of fewer of
them down to one; none when even its last token never occurred before. This draft too depends only on tokens
already generated and the context, so the output keeps its law.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

import trd_fast
from trd_fast.heads import LMHead
from trd_fast.trainer.rollout.kv_cache import CachedBatch
from trd_fast.trainer.rollout.sampling import SamplingConfig, filtered_weights, greedy, inverse_cdf, uniform
from trd_fast.trainer.rollout.trace import Trace

if TYPE_CHECKING:
    from trd_fast.trainer.rollout.generation import Runner

FINISHED_SHARE = 0.25  # stopped rows stay in the batch, fed nothing, until they are this share of it (taking rows
                       # out copies the KV cache of the others)


@dataclass(frozen=True)
class DraftConfig:
    tokens: int = 3    # D: draft tokens verified per forward and row; 0: no drafting
    match: int = 3     # generated tokens matched in the source to re-synchronise the pointer after a mismatch,
                       # and the longest run of them looked up in the context once the source is used up

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.match < 1:
            raise ValueError(f"match must be >= 1, got {self.match}")


class Drafter:
    """Per row, a draft source and an aligned pointer into it (see the module docstring)."""

    def __init__(self, config: DraftConfig, sources: Sequence[Tensor], eos_id: int,
                 prefixes: Sequence[int] | None = None, contexts: Sequence[Tensor] | None = None):
        """sources: per row 1-D int64 tokens to draft from; prefixes: per row, how many of its source's first
        tokens the row has already generated unchanged (default 0); contexts: per row 1-D int64 tokens before
        what it generates (its prompt), searched with them once the source is used up (default: none)."""
        prefixes = [0] * len(sources) if prefixes is None else [int(k) for k in prefixes]
        if len(prefixes) != len(sources):
            raise ValueError(f"prefixes: {len(prefixes)} for {len(sources)} sources")
        if contexts is not None and len(contexts) != len(sources):
            raise ValueError(f"contexts: {len(contexts)} for {len(sources)} sources")
        self.config = config
        self._eos = eos_id
        self._sources = []
        for source in sources:
            tokens = source.tolist()
            self._sources.append(tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens)
        before = [[] for _ in sources] if contexts is None else [x.tolist() for x in contexts]
        self._texts = [Lookup(x + source[:k], config.match) for x, source, k in zip(before, self._sources, prefixes)]
        self._starts = [len(x) for x in before]          # where the generated tokens start in the row's text
        self._position = prefixes                       # source position aligned with the row's next token
        self._guessed = [False] * len(sources)          # that position is an unconfirmed substitution guess
        self._replaced: list[dict[int, int]] = [{} for _ in sources]  # source position -> the token expected there
                                                                       # instead (a substitution carried forward)
        self._unconfirmed: list[int | None] = [None] * len(sources)  # the position the pending guess carried to
        self._indexes: dict[tuple[int, int], dict[tuple[int, ...], list[int]]] = {}  # (row, n) -> _ends(row, n)

    def __len__(self) -> int:
        return len(self._sources)

    def propose(self, row: int, room: int) -> list[int]:
        """Up to min(D, room) tokens: the source's from the row's pointer (with the substitutions carried forward),
        or once the pointer has run past the source, what followed the latest earlier occurrence of the row's last
        tokens in its text, cut before an EOS (as the source is: a drafted EOS would let a row go on past its end)."""
        count, position, source = max(0, min(self.config.tokens, room)), self._position[row], self._sources[row]
        if position < len(source):
            return [self._expected(row, j) for j in range(position, min(position + count, len(source)))]
        drafted = self._texts[row].follow(count)
        return drafted[:drafted.index(self._eos)] if self._eos in drafted else drafted  # EOS ends a row: not drafted

    def aligned(self, row: int) -> bool:
        """No substitution guess is pending for the row (its last token matched the source, or the pointer was
        re-synchronised after a failed guess) and its source goes on."""
        return not self._guessed[row] and self._position[row] < len(self._sources[row])

    def advance(self, row: int, tokens: Sequence[int], accepted: int) -> None:
        """The row generated `tokens`: the first `accepted` of its proposal, then one token of its own."""
        text = self._texts[row]
        text.extend(tokens)
        source, position = self._sources[row], self._position[row] + accepted
        confirmed = accepted > 0 or not self._guessed[row]
        guess = position + 1
        matched = position < len(source) and self._expected(row, position) == tokens[accepted]
        if matched:
            self._position[row], self._guessed[row], self._unconfirmed[row] = guess, False, None
        elif confirmed:
            self._unconfirmed[row] = self._carry_forward(row, position, tokens[accepted])
            self._position[row], self._guessed[row] = guess, True
        else:  # the guess failed (a token inserted or dropped, not substituted): what it carried goes too
            self._replaced[row].pop(self._unconfirmed[row], None)
            self._unconfirmed[row] = None
            last = text.tokens[max(self._starts[row], len(text.tokens) - self.config.match):]
            ends = self._ends(row, self.config.match).get(tuple(last), ())
            self._position[row] = min(ends, key=lambda e: (abs(e - guess), -e)) if ends else guess
            self._guessed[row] = False

    def _expected(self, row: int, position: int) -> int:
        """The token the row is expected to write at a source position: the source's, or its replacement."""
        return self._replaced[row].get(position, self._sources[row][position])

    def _carry_forward(self, row: int, position: int, token: int) -> int | None:
        """The row wrote `token` at a source position holding another: expect it where the source next holds that
        one too. Returns that later position (None: there is none)."""
        source = self._sources[row]
        if position >= len(source):
            return None
        ends = self._ends(row, 1)[(source[position],)]           # just past each occurrence, ascending
        at = bisect.bisect_right(ends, position + 1)                 # the first occurrence after `position`
        if at == len(ends):
            return None
        later = ends[at] - 1
        self._replaced[row][later] = token
        return later

    def _ends(self, row: int, n: int) -> dict[tuple[int, ...], list[int]]:
        """The row's source n-grams -> the positions just past each occurrence, ascending (built on first use)."""
        if (row, n) not in self._indexes:
            source, index = self._sources[row], {}
            for end in range(n, len(source) + 1):
                index.setdefault(tuple(source[end - n:end]), []).append(end)
            self._indexes[row, n] = index
        return self._indexes[row, n]


class Lookup:
    """A growing token sequence indexed for prompt lookup: each n-gram (n <= longest) that something follows ->
    the position just past its latest such occurrence. The index is brought up to date when it is read."""

    def __init__(self, tokens: Sequence[int], longest: int):
        self.tokens = list(tokens)
        self.longest = longest
        self._latest: dict[tuple[int, ...], int] = {}
        self._indexed = 0                                   # n-grams ending before this position are indexed

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def follow(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the sequence's last `longest`
        tokens, else of fewer of them (down to 1); [] when none of them occurred before."""
        tokens, latest, size = self.tokens, self._latest, len(self.tokens)
        for n in range(1, self.longest + 1):        # the n-grams ending at `end` (before the last token) are followed
            first = max(self._indexed, n)
            grams = zip(*(tokens[first - n + i:size - n + i] for i in range(n)))  # tokens[end - n:end] per end
            latest.update(zip(grams, range(first, size)))
        self._indexed = size
        for n in range(min(self.longest, len(tokens)), 0, -1):
            end = latest.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end:end + count]
        return []


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
    forward is recorded in the ledger as it is fed, rejected draft tails included.

    A row that stopped stays in the batch, fed nothing, until the stopped rows are FINISHED_SHARE of it: taking
    rows out copies the KV cache of the others, which costs more than carrying a few idle rows for a while."""
    device, head = runner.device, runner.head                 # the head read once: nothing swaps it mid-call
    batch = alive.tolist()                                  # the trace row of each batch row, in cache order
    room = (budget[alive] - trace.lengths[alive]).tolist()  # per batch row, the tokens it may still draw
    history = [list(h) for h in history] if history is not None else [[] for _ in heads]
    fed = [h.tolist() for h in heads]                       # per batch row, the head its next forward feeds
                                                            # (nothing once it stopped)
    live = list(range(len(batch)))                          # the batch rows still generating
    pending = None                                          # [B] int64 each batch row's pending token
    bar = tqdm(desc=progress, unit="forward", disable=progress is None, leave=False)
    while live:
        proposals = [[] for _ in batch]
        for r in live:
            proposals[r] = drafter.propose(batch[r], room[r] - 1)
        counts = [len(p) for p in proposals]
        width = max(counts)
        drafts = torch.tensor([p + [runner.pad_id] * (width - len(p)) for p in proposals],
                              dtype=torch.int64).view(len(batch), width).to(device)        # [B, D]
        lengths = torch.tensor(counts, device=device)                                       # [B]
        ledger_rows = [rows[i] for i in batch]
        if pending is None:  # the prompts
            hidden, state = runner.prefill(ledger_rows, heads, [d[:n] for d, n in zip(drafts, counts)],
                                           keep=width + 1, state=state, history=history, draft=True)
        else:                # the pending tokens, laid out directly: one head slot per row, the drafts after it
            going = [len(f) for f in fed]
            ids = torch.cat([pending[:, None], drafts], dim=1)                              # [B, 1 + D]
            slots = torch.cat([torch.tensor(going, dtype=torch.bool, device=device)[:, None],
                               torch.arange(width, device=device) < lengths[:, None]], dim=1)  # [B, 1 + D]
            hidden, state = runner.run_batch(ledger_rows, ids, slots, going, counts, keep=width + 1, state=state,
                                             history=history, draft=True)                  # [B, 1 + D, H]
        heads_fed = fed
        index = None if len(live) == len(batch) else torch.tensor(live, device=device)
        if index is not None:
            hidden, drafts, lengths = hidden[index], drafts[index], lengths[index]
        logits = head.logits(hidden)                                         # [L, 1 + D, V]: the verified rows
        accepted, token = verify(logits, drafts, lengths, sampling, generator, runner.vocab_size)
        _record(runner, head, trace, torch.tensor([batch[r] for r in live], device=device), hidden, logits,
                drafts, accepted, token, capture)
        del logits
        taken, drawn = accepted.tolist(), token.tolist()
        runner.counters.accepted_tokens += sum(taken)
        pending = token if index is None else torch.full((len(batch),), runner.pad_id, dtype=torch.int64,
                                                         device=device).index_copy_(0, index, token)   # [B]
        kept = [0] * len(batch)                             # per batch row, the draft tokens it accepted
        fed = [[] for _ in batch]
        for r, a, t in zip(live, taken, drawn):
            drafter.advance(batch[r], proposals[r][:a] + [t], a)
            history[r] += heads_fed[r] + proposals[r][:a]
            room[r] -= a + 1
            kept[r] = a
            if t != runner.eos_id and room[r] > 0:
                fed[r] = [t]
        live = [r for r in live if fed[r]]
        if live:
            state = _drop_rejected(state, torch.tensor(kept, device=device), width, longest=max(taken))
        if live and len(batch) - len(live) >= FINISHED_SHARE * len(batch):
            state = state.keep_rows(torch.tensor(live, device=device))
            batch, room, history, fed = ([x[r] for r in live] for x in (batch, room, history, fed))
            pending = pending[live]
            live = list(range(len(batch)))
        bar.update(1)
    bar.close()


def _record(runner: Runner, head: LMHead, trace: Trace, alive: Tensor, hidden: Tensor, logits: Tensor, drafts: Tensor,
            accepted: Tensor, token: Tensor, capture: bool) -> None:
    """Each alive row's accepted draft tokens, then its own token, into the trace with what the capture keeps of
    their slots (hidden states [A, 1 + D, H], logits [A, 1 + D, V])."""
    slots = torch.arange(logits.shape[1], device=logits.device)                        # [1 + D]
    padded = torch.cat([drafts, token[:, None]], dim=1)                                 # [A, 1 + D]
    tokens = torch.where(slots < accepted[:, None], padded, token[:, None])             # [A, 1 + D]
    kept = None
    if capture:
        flat = runner.capture.parts(hidden.flatten(0, 1), logits.flatten(0, 1), head)
        kept = tuple(part.view(*tokens.shape, *part.shape[1:]) for part in flat)     # [A, 1 + D, *] each
    trace.add_runs(alive, tokens, trd_fast.token_logprobs(logits, tokens), kept, accepted + 1, runner.eos_id)


def _drop_rejected(state: CachedBatch, accepted: Tensor, width: int, *, longest: int) -> CachedBatch:
    """The batch with the rejected draft slots of the last forward (its last `width` columns; row i kept its
    first accepted[i]) masked out, cut back to the longest kept block (`longest`: the most any row kept)."""
    start = state.mask.shape[1] - width
    kept = torch.arange(width, device=accepted.device) < accepted[:, None]                # [B, D]
    mask = torch.cat([state.mask[:, :start], state.mask[:, start:] & kept], dim=1)
    return CachedBatch(state.cache, mask).crop(start + longest)
