"""Batched generation and scoring with a KV cache, through one Runner per model, which counts every token fed
and notices re-scoring (see counters.Ledger)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

import trd_fast
from trd_fast.heads import LMHead, decoder_output, lm_head
from trd_fast.trainer.rollout.capture import Capture, Target
from trd_fast.trainer.rollout.counters import Ledger, TokenCounters
from trd_fast.trainer.rollout.draft import Drafter, verify_decode
from trd_fast.trainer.rollout.kv_cache import CACHE_KEYWORD, CachedBatch, check_filled, growing_cache
from trd_fast.trainer.rollout.sampling import SamplingConfig, sample
from trd_fast.trainer.rollout.trace import Trace

__all__ = ["Rollout", "Runner", "SamplingConfig", "TokenCounters", "resolve_row_ids"]


@dataclass(frozen=True)
class Rollout:
    tokens: Tensor           # [B, M] int64 generated ids, pad_id after each row's end
    lengths: Tensor          # [B] int64 generated tokens per row (EOS included when produced)
    logprobs: Tensor         # [B, M] fp32 log softmax(raw logits) at the sampled token, 0 past the end
    targets: list[Target] | None  # per row what the capture kept of the position of each token (None: nothing)
    finished: Tensor         # [B] bool: stopped on EOS

    def rows(self) -> list[Tensor]:
        """Each row's generated tokens, 1-D int64 of its length."""
        return [self.tokens[b, :n] for b, n in enumerate(self.lengths.tolist())]


class Runner:
    """Every forward of one model goes through it (so counters and the ledger see them all)."""

    def __init__(self, model, *, pad_id: int, eos_id: int, name: str, vocab_size: int | None = None,
                 capture: Capture = Capture()):
        self.model = model            # a causal LM taking input_ids, attention_mask, position_ids, the KV cache and
                                      # logits_to_keep; its LM head is applied only where it samples (backbone())
        self.pad_id = pad_id          # fills rows after their end, and padding slots
        self.eos_id = eos_id          # ends a row
        self.name = name              # for messages
        self.vocab_size = vocab_size  # sample only ids below it (the tokenizer's size), None: every logit column
        self.capture = capture        # what generation with capture=True keeps per token (hidden states / top-k)
        self.counters = TokenCounters()
        self.ledger = Ledger()

    @classmethod
    def with_tokenizer(cls, model, tokenizer, *, name: str, capture: Capture = Capture()) -> Runner:
        """A Runner with the tokenizer's pad and eos ids that samples only ids the tokenizer has."""
        return cls(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, name=name,
                   vocab_size=len(tokenizer), capture=capture)

    @property
    def head(self) -> LMHead:
        """The model's LM head (weight, bias, logit scale, softcap), read at each use: a wrapper (FSDP) may swap
        the parameter objects after the runner was made."""
        return lm_head(self.model, self.name)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_step(self) -> None:
        """Fresh counters and ledger."""
        self.counters = TokenCounters()
        self.ledger = Ledger()

    @torch.no_grad()
    def generate(self, contexts: Sequence[Tensor], sampling: SamplingConfig, *, generator: torch.Generator,
                 capture: bool, progress: str | None = None, row_ids: Sequence[int] | None = None,
                 drafter: Drafter | None = None) -> Rollout:
        """Sample a completion of each context (1-D int64 tokens, lengths may differ): one prefill of the
        left-padded batch, then one decode forward per token with the KV cache. A row stops at EOS; all stop at
        sampling.max_new_tokens. `progress` is the description of a bar over decode steps (None: no bar).
        With a `drafter` (one source per context), every forward also verifies a draft (rollout/draft.py): the
        same tokens when greedy, the same distribution when sampled, in fewer forwards. With `capture` the
        rollout keeps, per token, what self.capture keeps of the forward that predicted it."""
        contexts = self.inputs(contexts)
        rows = resolve_row_ids(row_ids, len(contexts))
        trace = Trace(len(contexts), self.device)
        everyone = torch.arange(len(contexts), device=self.device)
        budget = torch.full_like(trace.lengths, sampling.max_new_tokens)
        if drafter is not None:
            if len(drafter) != len(contexts):
                raise ValueError(f"drafter: {len(drafter)} sources for {len(contexts)} contexts")
            verify_decode(self, drafter, rows=rows, heads=contexts, history=None, state=None, trace=trace,
                          alive=everyone, budget=budget, sampling=sampling, generator=generator,
                          capture=capture, progress=progress)
            return self.rollout(trace, capture)
        hidden, state = self.prefill(rows, contexts, keep=1)                # [B, 1, H]
        tokens = self.draw(trace, everyone, hidden[:, -1], sampling, generator, capture=capture)
        going = (tokens != self.eos_id) & (trace.lengths < sampling.max_new_tokens)
        alive = going.nonzero()[:, 0]
        if len(alive) < len(contexts):
            state = state.select(alive)
        self.decode(state, trace, alive, tokens, budget, sampling, generator, capture=capture, progress=progress)
        generated = trace.tokens(self.pad_id)                               # [B, M]
        lengths = trace.lengths.tolist()
        self.account_decode(rows, [torch.cat([x, y[:n - 1]]) for x, y, n in zip(contexts, generated, lengths)],
                            [len(x) for x in contexts])
        return self.rollout(trace, capture)

    def rollout(self, trace: Trace, capture: bool) -> Rollout:
        """The generated rows of a finished trace."""
        return Rollout(tokens=trace.tokens(self.pad_id), lengths=trace.lengths, logprobs=trace.logprobs(),
                       targets=self.kept_targets(trace) if capture else None, finished=trace.finished)

    def kept_targets(self, trace: Trace) -> list[Target]:
        """Per trace row, the target of each drawn token from what the capture kept (releasing the trace's)."""
        kept = trace.take_kept()
        return [self.capture.target([part[b, :n] for part in kept]) for b, n in enumerate(trace.lengths.tolist())]

    def targets(self, hidden: Tensor) -> Target:
        """The target of positions whose final hidden states are hidden [n, H] (scored, not sampled)."""
        return self.capture.target(self.capture.parts(hidden, None, self.head))

    @torch.no_grad()
    def score(self, contexts: Sequence[Tensor], continuations: Sequence[Tensor], *,
              row_ids: Sequence[int] | None = None) -> Tensor:
        """One forward over each context + continuation (left-padded batch, no cache kept): [B, M, H] final hidden
        states (the model's dtype) predicting each continuation token (row b valid for its first
        len(continuations[b]), 0 beyond); no logits are formed."""
        contexts = self.inputs(contexts)
        continuations = [y.to(self.device) for y in continuations]
        if len(continuations) != len(contexts):
            raise ValueError(f"continuations: {len(continuations)} rows for {len(contexts)} contexts")
        width = max((len(y) for y in continuations), default=0)
        hidden, _ = self.prefill(resolve_row_ids(row_ids, len(contexts)), contexts, [y[:-1] for y in continuations],
                                 keep=max(width, 1), use_cache=False)      # [B, max(M, 1), H]
        hidden = hidden[:, :width]
        for b, y in enumerate(continuations):
            hidden[b, len(y):] = 0
        return hidden

    def prefill(self, rows: Sequence[int], heads: Sequence[Tensor], tails: Sequence[Tensor] | None = None, *,
                keep: int, state: CachedBatch | None = None, history: Sequence[list[int]] | None = None,
                use_cache: bool = True, draft: bool = False) -> tuple[Tensor, CachedBatch | None]:
        """One forward feeding row b heads[b] + tails[b] after what `state` caches for it (`history[b]`: those
        token ids, for the ledger). Heads are right-aligned (left padding) and tails left-aligned after them (right
        padding), so tail positions line up across rows: with H the longest head, slot H - 1 + j predicts tail
        token j of every row. Returns the final hidden states of the last `keep` slots [B, keep, H] (the model's
        dtype; self.head.logits gives their logits) and the batch with the new tokens cached (None without
        use_cache). With `draft` the tails are draft tokens to verify (counted as draft_tokens) and heads fed
        after a cached `state` are generated tokens (decode_tokens)."""
        tails = tails if tails is not None else [heads[0].new_zeros(0)] * len(heads)
        head_lengths, tail_lengths = [h.shape[0] for h in heads], [t.shape[0] for t in tails]
        head_width = max(head_lengths)
        ids = torch.cat([pad_sequence(list(heads), batch_first=True, padding_value=self.pad_id, padding_side="left"),
                         pad_sequence(list(tails), batch_first=True, padding_value=self.pad_id)], dim=1)  # [B, W]
        slot = torch.arange(ids.shape[1], device=ids.device)
        fed = ((slot >= head_width - torch.tensor(head_lengths, device=ids.device)[:, None])
               & (slot < head_width + torch.tensor(tail_lengths, device=ids.device)[:, None]))  # [B, W]
        return self.run_batch(rows, ids, fed, head_lengths, tail_lengths, keep=keep, state=state, history=history,
                              use_cache=use_cache, draft=draft)

    def run_batch(self, rows: Sequence[int], ids: Tensor, fed: Tensor, head_lengths: Sequence[int],
                  tail_lengths: Sequence[int], *, keep: int, state: CachedBatch | None = None,
                  history: Sequence[list[int]] | None = None, use_cache: bool = True,
                  draft: bool = False) -> tuple[Tensor, CachedBatch | None]:
        """prefill's forward on its batch already laid out: ids [B, W] int64 with row b's head (head_lengths[b]
        tokens) right-aligned before column H = max(head_lengths) and its tail (tail_lengths[b]) left-aligned
        from H, fed [B, W] bool marking those tokens."""
        head_width = max(head_lengths)
        past = state.mask if state is not None else fed[:, :0]                              # [B, S]
        cache = None
        if use_cache:
            cache = state.cache if state is not None else growing_cache(self.model.config, self.name)
        positions = past.sum(-1, keepdim=True) + (fed.cumsum(-1) - 1).clamp(min=0)        # [B, W]
        mask = torch.cat([past, fed], dim=1)                                                # [B, S + W]
        out = self.backbone(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                            **{CACHE_KEYWORD: cache}, use_cache=use_cache)
        if use_cache:
            check_filled(cache, mask.shape[1], self.name)
        history = history if history is not None else [[] for _ in head_lengths]
        fed_ids = ids.tolist()
        sequences = [p + row[head_width - h:head_width + t]
                     for p, row, h, t in zip(history, fed_ids, head_lengths, tail_lengths)]
        counts = self.ledger.feed(rows, sequences, [len(p) for p in history])
        fed_heads, fed_tails = sum(head_lengths), sum(tail_lengths)
        if not draft:
            self.counters.prefill_tokens += fed_heads + fed_tails
        elif state is None:
            self.counters.prefill_tokens += fed_heads
        else:
            self.counters.decode_tokens += fed_heads
        self.counters.draft_tokens += fed_tails if draft else 0
        self.counters.forwards += 1
        self.counters.rescore_forwards += int(any(counts))
        self.counters.rescore_tokens += sum(counts)
        hidden = out.last_hidden_state[:, ids.shape[1] - keep:].contiguous()    # [B, keep, H] (frees the rest)
        return hidden, (CachedBatch(cache, mask) if use_cache else None)

    def decode(self, state: CachedBatch, trace: Trace, alive: Tensor, pending: Tensor, budget: Tensor,
               sampling: SamplingConfig, generator: torch.Generator, *, capture: bool,
               progress: str | None) -> None:
        """Feed every alive row (indices [A] into the trace; `state` holds them in that order) its pending token
        (pending [R]), sample its next one into the trace, and repeat until each row stopped at EOS or at its
        budget (budget [R]: the trace length it may reach). The caller accounts the fed tokens in the ledger."""
        pending = pending.clone()
        steps = int((budget[alive] - trace.lengths[alive]).max()) if len(alive) else 0
        bar = tqdm(total=steps, desc=progress, disable=progress is None, leave=False)
        while len(alive):
            slot = torch.ones(len(alive), 1, dtype=torch.bool, device=self.device)
            mask = torch.cat([state.mask, slot], dim=1)                                       # [A, S + 1]
            out = self.backbone(input_ids=pending[alive][:, None], attention_mask=mask.long(),
                                position_ids=state.lengths[:, None], **{CACHE_KEYWORD: state.cache}, use_cache=True)
            check_filled(state.cache, mask.shape[1], self.name)
            state = CachedBatch(state.cache, mask)
            self.counters.decode_tokens += len(alive)
            self.counters.forwards += 1
            tokens = self.draw(trace, alive, out.last_hidden_state[:, -1], sampling, generator, capture=capture)
            pending[alive] = tokens
            going = (tokens != self.eos_id) & (trace.lengths[alive] < budget[alive])
            if not bool(going.all()):
                keep = going.nonzero()[:, 0]
                state, alive = state.keep_rows(keep), alive[keep]
            bar.update(1)
        bar.close()

    def backbone(self, **inputs):
        """The model's own forward (so a wrapper's hooks, FSDP's root first, see it) with its head on no position;
        returns its decoder's output, whose last_hidden_state [B, W, H] are the final hidden states."""
        return decoder_output(self.model, inputs)

    def draw(self, trace: Trace, rows: Tensor, hidden: Tensor, sampling: SamplingConfig,
             generator: torch.Generator, *, capture: bool) -> Tensor:
        """Sample one token for each of rows [A] from the logits of final hidden states [A, H] (the one [A, V]
        logits row formed per position) and record it in the trace."""
        logits = self.head.logits(hidden)                                                   # [A, V] fp32
        tokens = sample(logits, sampling, generator, self.vocab_size)                       # [A]
        self.record(trace, rows, tokens, hidden, logits, capture=capture)
        return tokens

    def record(self, trace: Trace, rows: Tensor, tokens: Tensor, hidden: Tensor, logits: Tensor, *,
               capture: bool) -> None:
        """Record tokens [A] of rows [A], drawn from raw logits [A, V] of final hidden states [A, H] (with
        `capture`, what self.capture keeps of them)."""
        kept = self.capture.parts(hidden, logits, self.head) if capture else None
        trace.add(rows, tokens, trd_fast.token_logprobs(logits, tokens), kept, self.eos_id)

    def account_decode(self, rows: Sequence[int], sequences: Sequence[Tensor], starts: Sequence[int]) -> None:
        """Ledger entries for one decode run: row i fed sequences[i][starts[i]:], one token per forward from the
        run's first forward on, so the run's re-scoring forwards are the longest re-scored stretch."""
        counts = self.ledger.feed(rows, [s.tolist() for s in sequences], starts)
        self.counters.rescore_forwards += max(counts, default=0)
        self.counters.rescore_tokens += sum(counts)

    def inputs(self, contexts: Sequence[Tensor], name: str = "contexts") -> list[Tensor]:
        """The contexts checked (non-empty 1-D int64 each) and moved to the model's device."""
        if len(contexts) == 0:
            raise ValueError(f"{self.name}: {name} is empty")
        for i, x in enumerate(contexts):
            if x.ndim != 1 or x.dtype != torch.int64 or len(x) == 0:
                raise ValueError(f"{self.name}: {name}[{i}] must be a non-empty 1-D int64 tensor, "
                                 f"got shape {tuple(x.shape)} {x.dtype}")
        device = self.device
        return [x.to(device) for x in contexts]


def resolve_row_ids(row_ids: Sequence[int] | None, count: int) -> list[int]:
    """The ledger's row id of each of `count` rows: their batch index by default."""
    if row_ids is None:
        return list(range(count))
    if len(row_ids) != count:
        raise ValueError(f"row_ids: {len(row_ids)} ids for {count} rows")
    return [int(r) for r in row_ids]
