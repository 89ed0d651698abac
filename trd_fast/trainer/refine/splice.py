"""TRD-splice: the teacher scores the student's rollout y_o once, a prefix scan of a per-token signal finds each
row's failure point k, and the teacher continues from k on its own prefix KV cache: y_r = y_o[:k] + its tokens.

The teacher never feeds a token twice. Scoring feeds context + y_o[:n - 1] for the n positions it scores and keeps
their final hidden states (no logits: the signal applies the LM head in row blocks); the continuation samples its
first token from the logits of the scoring hidden state at k and, while it draws y_o's own token and the next
scoring hidden state exists, keeps sampling from those (they are what a forward would compute); the first token
that differs from y_o, or runs past the scored positions, is fed on the cache cut back to context + y_r[:p].
With a draft config, the continuation from there verifies drafts from y_o (rollout/draft.py): they start
after that token, so never at a position scoring already fed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

import trd_fast
from trd_fast.trainer.rollout.capture import Target, concat_targets
from trd_fast.trainer.rollout.draft import DraftConfig, Drafter, verify_decode
from trd_fast.trainer.rollout.generation import Rollout, Runner, resolve_row_ids
from trd_fast.trainer.rollout.kv_cache import CachedBatch, realign
from trd_fast.trainer.rollout.sampling import SamplingConfig
from trd_fast.trainer.rollout.trace import Trace

# (start, stop, teacher final hidden states [B, stop - start, H] for y_o positions [start, stop)) -> signal
# [B, stop - start]
SignalFn = Callable[[int, int, Tensor], Tensor]


@dataclass(frozen=True)
class Splice:
    cut: Tensor           # [B] int64 failure point k per row (== len(y_o[b]) when the row has no failure)
    failed: Tensor        # [B] bool
    tokens: list[Tensor]  # y_r per row: y_o[b][:k] followed by the teacher's continuation (y_o[b] when no failure)
    targets: list[Target] # per row the teacher's target of each y_r token (its capture's: hidden states or top-k)
    signal: Tensor        # [B, L] fp32 the per-token signal on y_o at the scored positions, 0 beyond
    scored: Tensor        # [B] int64 how many y_o positions the teacher scored per row


@dataclass(frozen=True)
class _Scoring:
    signal: Tensor                                # [B, L] fp32, 0 beyond `scored`
    scored: Tensor                                # [B] int64 y_o positions scored per row
    cut: Tensor                                   # [B] int64 failure point, == len(y_o) when none
    hidden: list[Tensor]                          # per row [scored, H] the teacher's scoring hidden states
    caches: dict[int, tuple[CachedBatch, int]]    # failed row -> (batch, its row there): context + y_o[:scored - 1]


@torch.no_grad()
def splice(teacher: Runner, contexts: Sequence[Tensor], rollout: Rollout, signal_fn: SignalFn, *,
           threshold: float, window: int, chunk: int | None, sampling: SamplingConfig,
           generator: torch.Generator, row_ids: Sequence[int] | None = None,
           progress: str | None = None, draft: DraftConfig | None = None) -> Splice:
    """Score each rollout row with the teacher after its own context, find k = prefix_scan(signal).first, and
    let the teacher continue the failed rows from k (targets: kept from its scoring forwards for positions < k,
    from its generating forwards after). With `chunk`, y_o is scored `chunk` tokens at a time on the KV cache
    and a row stops being scored once its failure point is found; None scores everything in one pass. With
    `draft` (tokens > 0) the continuation verifies drafts from y_o: the same tokens when greedy, the same
    distribution when sampled."""
    contexts = teacher.inputs(contexts)
    if len(contexts) != len(rollout.tokens):
        raise ValueError(f"contexts: {len(contexts)} rows for a rollout of {len(rollout.tokens)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be None or >= 1, got {chunk}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    rows = resolve_row_ids(row_ids, len(contexts))
    y_o = [y.to(teacher.device) for y in rollout.rows()]
    scoring = _score(teacher, contexts, y_o, rollout.tokens.shape[1], signal_fn, threshold, window, chunk, rows)
    failed = scoring.cut < rollout.lengths.to(teacher.device)
    y_r, targets = _continue(teacher, contexts, y_o, scoring, failed, sampling, generator, rows, progress, draft)
    return Splice(cut=scoring.cut, failed=failed, tokens=y_r, targets=targets, signal=scoring.signal,
                  scored=scoring.scored)


def _score(teacher: Runner, contexts: list[Tensor], y_o: list[Tensor], width: int, signal_fn: SignalFn,
           threshold: float, window: int, chunk: int | None, rows: list[int]) -> _Scoring:
    count, device = len(contexts), teacher.device
    lengths = [len(y) for y in y_o]
    step = max(lengths, default=0) if chunk is None else chunk
    signal = torch.zeros(count, width, device=device)
    scored = torch.zeros(count, dtype=torch.int64, device=device)
    pieces: list[list[Tensor]] = [[] for _ in range(count)]
    caches: dict[int, tuple[CachedBatch, int]] = {}
    active = [b for b in range(count) if lengths[b] > 0]
    state, start = None, 0
    while active:
        ends = [min(start + step, lengths[b]) for b in active]       # rows scored up to here after this round
        stop = max(ends)
        if start == 0:   # contexts + y_o[:end - 1]: the context's last token predicts position 0
            heads, history = [contexts[b] for b in active], None
            tails = [y_o[b][:end - 1] for b, end in zip(active, ends)]
        else:            # y_o[start - 1:end - 1] on the cache holding context + y_o[:start - 1]
            heads = [y_o[b][:0] for b in active]
            tails = [y_o[b][start - 1:end - 1] for b, end in zip(active, ends)]
            history = [torch.cat([contexts[b], y_o[b][:start - 1]]).tolist() for b in active]
        hidden, state = teacher.prefill([rows[b] for b in active], heads, tails, keep=stop - start, state=state,
                                        history=history)             # [A, stop - start, H], slot j = start + j
        index = torch.tensor(active, device=device)
        valid = torch.arange(stop - start, device=device) < (torch.tensor(ends, device=device) - start)[:, None]
        hidden.masked_fill_(~valid[..., None], 0.0)
        block = hidden if len(active) == count else hidden.new_zeros(count, *hidden.shape[1:]).index_copy_(
            0, index, hidden)                                             # [B, stop - start, H]
        values = signal_fn(start, stop, block)
        if tuple(values.shape) != (count, stop - start):
            raise ValueError(f"signal_fn must return [{count}, {stop - start}] for positions [{start}, {stop}), "
                             f"got {tuple(values.shape)}")
        signal[index, start:stop] = torch.where(valid, values[index].float(), 0.0)
        scored[index] = torch.tensor(ends, device=device)
        for i, (b, end) in enumerate(zip(active, ends)):
            pieces[b].append(hidden[i, :end - start])
        _, first = trd_fast.prefix_scan(signal[:, :stop], scored, threshold=threshold, window=window)
        found = (first[index] < scored[index]).tolist()
        left = [i for i, b in enumerate(active) if not found[i] and ends[i] < lengths[b]]
        failures = [i for i in range(len(active)) if found[i]]
        if failures:  # keep the failed rows' caches for the continuation (a copy while others go on)
            kept = state.select(torch.tensor(failures, device=device)) if left else state
            for j, i in enumerate(failures):
                caches[active[i]] = (kept, j if left else i)
        if left and len(left) < len(active):
            state = state.select(torch.tensor(left, device=device))
        active, start = [active[i] for i in left], stop
    _, cut = trd_fast.prefix_scan(signal, scored, threshold=threshold, window=window)
    empty = teacher.head.weight.new_zeros(0, teacher.head.weight.shape[1])                  # [0, H]
    hidden = [torch.cat(p) if p else empty for p in pieces]
    return _Scoring(signal=signal, scored=scored, cut=cut, hidden=hidden, caches=caches)


def _continue(teacher: Runner, contexts: list[Tensor], y_o: list[Tensor], scoring: _Scoring, failed: Tensor,
              sampling: SamplingConfig, generator: torch.Generator, rows: list[int], progress: str | None,
              draft: DraftConfig | None) -> tuple[list[Tensor], list[Tensor]]:
    """y_r and targets per row: the failed rows continued from their cut, the others as scored."""
    fails = failed.nonzero()[:, 0].tolist()
    y_r = list(y_o)
    targets = [None if b in fails else teacher.targets(h) for b, h in enumerate(scoring.hidden)]
    if not fails:
        return y_r, targets
    device = teacher.device
    trace = Trace(len(fails), device)
    position = scoring.cut[fails].clone()                             # [F] y position of the next token to draw
    scored = scoring.scored[fails]                                    # [F]
    last = torch.zeros(len(fails), dtype=torch.int64, device=device)  # [F] the token each row drew last
    replaying, needs = torch.arange(len(fails), device=device), []
    while len(replaying):   # draw from the scoring hidden states while the teacher agrees with y_o
        at = position[replaying]
        hidden = torch.stack([scoring.hidden[fails[i]][p] for i, p in zip(replaying.tolist(), at.tolist())])
        drawn = teacher.draw(trace, replaying, hidden, sampling, generator, capture=True)
        last[replaying] = drawn
        going = (drawn != teacher.eos_id) & (trace.lengths[replaying] < sampling.max_new_tokens)
        same = torch.tensor([int(y_o[fails[i]][p]) for i, p in zip(replaying.tolist(), at.tolist())],
                            device=device) == drawn
        agree = same & (at + 1 < scored[replaying])
        needs.append(replaying[going & ~agree])
        replaying = replaying[going & agree]
        position[replaying] += 1
    needs = torch.cat(needs)
    if len(needs):
        state = realign([(*scoring.caches[fails[i]], len(contexts[fails[i]]) + int(position[i]))
                         for i in needs.tolist()])
        scoring.caches.clear()  # the scoring caches go before decoding starts
        budget = torch.full_like(trace.lengths, sampling.max_new_tokens)
        if draft is not None and draft.tokens:
            _continue_drafted(teacher, contexts, y_o, fails, state, trace, needs, position, last, budget, sampling,
                              generator, rows, progress, draft)
        else:
            teacher.decode(state, trace, needs, last, budget, sampling, generator, capture=True,
                           progress=progress)
    drawn_tokens, drawn_targets = trace.tokens(teacher.pad_id), teacher.kept_targets(trace)
    for i, (b, n, k) in enumerate(zip(fails, trace.lengths.tolist(), scoring.cut[fails].tolist())):
        y_r[b] = torch.cat([y_o[b][:k], drawn_tokens[i, :n]])
        targets[b] = concat_targets([teacher.targets(scoring.hidden[b][:k]), drawn_targets[i]])
    if draft is not None and draft.tokens:
        return y_r, targets   # the verifying forwards were recorded in the ledger as they were fed
    teacher.account_decode([rows[fails[i]] for i in needs.tolist()],
                           [torch.cat([contexts[fails[i]], y_r[fails[i]][:-1]]) for i in needs.tolist()],
                           [len(contexts[fails[i]]) + int(position[i]) for i in needs.tolist()])
    return y_r, targets


def _continue_drafted(teacher: Runner, contexts: list[Tensor], y_o: list[Tensor], fails: list[int],
                      state: CachedBatch, trace: Trace, needs: Tensor, position: Tensor, last: Tensor,
                      budget: Tensor, sampling: SamplingConfig, generator: torch.Generator, rows: list[int],
                      progress: str | None, draft: DraftConfig) -> None:
    """Decoding of the rows `needs` (trace rows; failed row fails[i] holds context + y_o[:position[i]] in
    `state`, its pending token last[i]) with drafts from y_o after the pending token."""
    at = position.tolist()
    drafter = Drafter(draft, [y_o[b] for b in fails], teacher.eos_id, prefixes=at)
    for i in needs.tolist():
        drafter.advance(i, [int(last[i])], 0)
    verify_decode(teacher, drafter, rows=[rows[b] for b in fails], heads=[last[i:i + 1] for i in needs.tolist()],
                  history=[torch.cat([contexts[fails[i]], y_o[fails[i]][:at[i]]]).tolist() for i in needs.tolist()],
                  state=state, trace=trace, alive=needs, budget=budget, sampling=sampling, generator=generator,
                  capture=True, progress=progress)
