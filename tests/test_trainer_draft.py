"""Draft-verified generation (trainer/rollout/draft.py) on tiny random Llama and Qwen3 models and on the shipped
task: greedy output and captured hidden states equal plain decoding for drafts accepted whole, not at all and in part;
sampled output follows the model's own filtered distribution; the counters add up and nothing is re-scored."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import PAD, VOCAB, fresh, implied, tiny_lm
from trd_fast.tasks import ChainTask, checkpoint_dir
from trd_fast.trainer.protocol import Tokenize
from trd_fast.trainer.refine.modes import build_batch
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.refine.splice import splice
from trd_fast.trainer.rollout.draft import DraftConfig, Drafter, Lookup
from trd_fast.trainer.rollout.generation import Runner, SamplingConfig
from trd_fast.trainer.rollout.sampling import filtered_weights
from trd_fast.trainer.run.config import from_dict
from trd_fast.trainer.run.engine import build_engine

EOS = 2
ATOL = 1e-5
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)

pytestmark = pytest.mark.usefixtures("one_thread")


class Counted:
    """A model seen through a counter of its forwards and of the real tokens each is fed (its new mask slots)."""

    def __init__(self, model):
        self.model, self.forwards, self.fed = model, 0, 0

    def __call__(self, *, input_ids, attention_mask, **kwargs):
        self.forwards += 1
        self.fed += int(attention_mask[:, -input_ids.shape[1]:].sum())
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_lm(request.param, seed=3)


def contexts(seed=0, lengths=(3, 8, 1, 5)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]


def rows(rollout):
    return [rollout.tokens[b, :n] for b, n in enumerate(rollout.lengths.tolist())]


def absent_token(y):
    """A token id that y never holds (a draft of it is rejected at every position)."""
    return next(t for t in range(3, VOCAB) if t not in y.tolist())


def check_counters(counters, model, rollout, batch):
    """Counters add up: every fed token is prefill, decode or draft; every generated token is an accepted draft
    token or the one own draw each row makes per forward it is in (its prompt's forward, then one per pending
    token fed back); nothing is re-scored."""
    assert counters.prefill_tokens + counters.decode_tokens + counters.draft_tokens == model.fed
    assert counters.forwards == model.forwards
    assert int(rollout.lengths.sum()) == counters.accepted_tokens + counters.decode_tokens + batch
    assert 0 <= counters.accepted_tokens <= counters.draft_tokens
    assert counters.rescore_forwards == counters.rescore_tokens == 0


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_greedy_drafts_give_plain_decoding(model, tokens):
    xs = contexts()
    plain_runner = Runner(model, pad_id=PAD, eos_id=EOS, name="teacher")
    plain = plain_runner.generate(xs, GREEDY, generator=torch.Generator(), capture=True)
    ys = rows(plain)
    assert len({len(y) for y in ys}) > 1 or max(len(y) for y in ys) == GREEDY.max_new_tokens
    y = ys[2]
    sources = [ys[0],                                                     # accepted whole
               torch.full((12,), absent_token(ys[1])),                    # accepted nowhere
               torch.cat([y[:2], torch.tensor([absent_token(y)]), y[3:]]),    # a substitution
               torch.cat([ys[3][:3], ys[3][5:8], torch.tensor([7, 8, 9]), ys[3][8:]])]  # a deletion, an insertion
    counted = Counted(model)
    runner = Runner(counted, pad_id=PAD, eos_id=EOS, name="teacher")
    drafted = runner.generate(xs, GREEDY, generator=torch.Generator(), capture=True,
                              drafter=Drafter(DraftConfig(tokens), sources, EOS))
    assert torch.equal(drafted.tokens, plain.tokens) and torch.equal(drafted.lengths, plain.lengths)
    assert torch.equal(drafted.finished, plain.finished)
    torch.testing.assert_close(drafted.targets, plain.targets, atol=ATOL, rtol=0)
    torch.testing.assert_close(drafted.logprobs, plain.logprobs, atol=ATOL, rtol=0)
    for b, y in enumerate(ys):  # rejected draft slots never reach a later token: a one-pass forward agrees
        torch.testing.assert_close(implied(model, drafted.targets[b]), fresh(model, xs[b], y), atol=ATOL, rtol=0)
    check_counters(runner.counters, counted, drafted, len(xs))
    assert 0 < runner.counters.accepted_tokens < runner.counters.draft_tokens
    assert runner.counters.forwards <= plain_runner.counters.forwards


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_a_draft_accepted_whole_or_nowhere(model, tokens):
    """One row alone: a draft equal to the plain output takes ceil(n / (D + 1)) forwards (D drafts and one own
    token each); a draft of a token the output never holds is rejected everywhere and takes n forwards."""
    x = contexts(seed=1)[1:2]
    plain = Runner(model, pad_id=PAD, eos_id=-1, name="teacher").generate(
        x, GREEDY, generator=torch.Generator(), capture=True)
    y = plain.tokens[0]
    n = len(y)
    for source, forwards, accepted in ((y, math.ceil(n / (tokens + 1)), None), (torch.full((n,), absent_token(y)), n, 0)):
        counted = Counted(model)
        runner = Runner(counted, pad_id=PAD, eos_id=-1, name="teacher")
        out = runner.generate(x, GREEDY, generator=torch.Generator(), capture=True,
                              drafter=Drafter(DraftConfig(tokens), [source], -1))
        assert torch.equal(out.tokens, plain.tokens)
        torch.testing.assert_close(out.targets, plain.targets, atol=ATOL, rtol=0)
        c = runner.counters
        assert c.forwards == forwards
        assert c.accepted_tokens == (n - forwards if accepted is None else accepted)
        check_counters(c, counted, out, 1)


def test_the_ledger_keeps_rejected_drafts_on_their_own_branch(model):
    x = contexts(seed=2)[:1]
    plain = Runner(model, pad_id=PAD, eos_id=-1, name="teacher").generate(
        x, GREEDY, generator=torch.Generator(), capture=False)
    y = plain.tokens[0]
    wrong = absent_token(y)
    runner = Runner(model, pad_id=PAD, eos_id=-1, name="teacher")
    runner.generate(x, GREEDY, generator=torch.Generator(), capture=False,
                    drafter=Drafter(DraftConfig(4), [torch.cat([y[:3], torch.full((9,), wrong)])], -1))
    c = runner.counters
    assert c.rescore_tokens == 0 and c.draft_tokens > c.accepted_tokens == 3
    path = len(x[0]) + len(y) - 1
    runner.score(x, [y])                                  # the output path: every token was computed
    assert c.rescore_tokens == path
    runner.score(x, [torch.cat([y[:3], torch.tensor([wrong, 0])])])   # the draft rejected after y[:3]: fed too
    assert c.rescore_tokens == path + len(x[0]) + 3 + 1
    other = next(t for t in range(3, VOCAB) if t not in (wrong, int(y[3])))
    runner.score(x, [torch.cat([y[:3], torch.tensor([other, 0])])])   # a token never fed there: new work
    assert c.rescore_tokens == path + 2 * (len(x[0]) + 3) + 1
    assert c.rescore_forwards == 3


def test_drafter_pointer():
    source = torch.tensor([10, 11, 12, 13, 14, 15, 16, 2, 99])   # EOS (2) ends the source
    drafter = Drafter(DraftConfig(tokens=3, match=2), [source] * 4, eos_id=2)
    assert drafter.propose(0, room=8) == [10, 11, 12] and drafter.propose(0, room=1) == [10]
    assert drafter.propose(0, room=0) == []
    drafter.advance(0, [10, 11, 12, 13], accepted=3)              # the own token matches: aligned on
    assert drafter.propose(0, room=8) == [14, 15, 16] and drafter.aligned(0)
    drafter.advance(0, [14, 15, 16], accepted=2)
    assert drafter.propose(0, room=8) == [] and not drafter.aligned(0)   # source used up (EOS excluded)
    drafter.advance(1, [10, 50], accepted=1)                      # 11 replaced by 50: a substitution guess
    assert drafter.propose(1, room=8) == [12, 13, 14] and not drafter.aligned(1)
    drafter.advance(1, [12, 14], accepted=1)                      # 13 dropped: guessed as a substitution too,
    assert drafter.propose(1, room=8) == [14, 15, 16]
    drafter.advance(1, [15], accepted=0)                          # which fails at once: "14 15" re-synchronises
    assert drafter.propose(1, room=8) == [16]
    drafter.advance(2, [77], accepted=0)                          # a guess that fails at once, and
    drafter.advance(2, [10], accepted=0)                          # "77 10" occurs nowhere: the guess is kept
    assert drafter.propose(2, room=8) == [12, 13, 14]
    drafter.advance(3, [10, 11, 77], accepted=2)                  # 77 inserted before 12: guessed as a
    drafter.advance(3, [12], accepted=0)                          # substitution, failed, "77 12" is nowhere;
    drafter.advance(3, [13], accepted=0)                          # a new guess (13 for 14) ...
    assert drafter.propose(3, room=8) == [15, 16]
    drafter.advance(3, [14], accepted=0)                          # ... fails: "13 14" re-synchronises (the
    assert drafter.propose(3, room=8) == [15, 16]                 # guess alone would propose [16])
    spliced = Drafter(DraftConfig(tokens=2, match=2), [source], eos_id=2, prefixes=[4])
    assert spliced.propose(0, room=8) == [14, 15]


def test_drafter_carries_a_substitution_forward():
    """`= 7 ; 7 + ... 7` rewritten with 9 for 7: the replaced token is drafted as its replacement at its next use in
    the source, and only there; a guess that fails (a token inserted, not substituted) takes its replacement back."""
    source = torch.tensor([10, 7, 12, 7, 13, 7, 2])
    drafter = Drafter(DraftConfig(tokens=3, match=2), [source, source, source], eos_id=2)
    drafter.advance(0, [10, 9], accepted=1)                       # 7 replaced by 9 at position 1
    assert drafter.propose(0, room=8) == [12, 9, 13]              # position 3 expects 9; position 5 still 7
    drafter.advance(0, [12, 9], accepted=1)                       # the own token 9 matches the replacement:
    assert drafter.propose(0, room=8) == [13, 7] and drafter.aligned(0)   # aligned, no guess
    drafter.advance(1, [10, 7, 12, 8], accepted=3)                # another row copies 7 at 1, replaces the 7 at
    assert drafter.propose(1, room=8) == [13, 8]                  # 3 by 8: 8 is expected at 5
    drafter.advance(2, [10, 5], accepted=1)                       # 7 at 1 "replaced" by 5: 5 expected at 3, but
    drafter.advance(2, [7], accepted=0)                           # 7 follows, not 12: the guess failed ("5 7" is
    assert drafter.propose(2, room=8) == [7, 13, 7]               # nowhere, so it is kept) and 3 expects 7 again


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    text = Lookup([5, 6, 7, 8, 5, 6, 9, 4, 5, 6], longest=3)
    assert text.follow(2) == [9, 4]                               # "4 5 6" nowhere before; "5 6" latest at 4
    text.extend([9, 4, 7])                                        # "4 7" nowhere; "7" latest followed by 8
    assert text.follow(3) == [8, 5, 6]
    text.extend([1])
    assert text.follow(3) == [] and text.follow(0) == []          # 1 never occurred before
    text.extend([9])
    assert text.follow(1) == [4]                                  # "1 9" nowhere; "9" latest at 10
    assert Lookup([], longest=3).follow(2) == [] and Lookup([3], longest=2).follow(2) == []


def test_drafter_looks_up_its_context_once_the_source_is_used_up():
    source, context = torch.tensor([10, 11]), torch.tensor([20, 21, 22, 23, 21, 22, 24, 25])
    drafter = Drafter(DraftConfig(tokens=3, match=2), [source, source], eos_id=2, contexts=[context, context])
    drafter.advance(0, [10, 11, 21], accepted=2)                  # source used up, then "21": after the latest
    assert drafter.propose(0, room=8) == [22, 24, 25]             # "21" of the context ("25 21" occurs nowhere)
    drafter.advance(0, [22, 24, 26], accepted=2)                  # "24 26" and "26" nowhere: no draft
    assert drafter.propose(0, room=8) == []
    drafter.advance(1, [30], accepted=0)                          # a substitution guess for 10: 11 next
    assert drafter.propose(1, room=8) == [11]
    drafter.advance(1, [11, 23], accepted=1)                      # the source used up: "23" -> "21 22 24"
    assert drafter.propose(1, room=8) == [21, 22, 24] and drafter.propose(1, room=2) == [21, 22]
    with pytest.raises(ValueError, match="contexts"):
        Drafter(DraftConfig(2), [source], 2, contexts=[context, context])


def test_a_looked_up_draft_stops_before_eos():
    """A context holding EOS (a chat template's end-of-turn) never drafts it: accepted, the row would go on."""
    source, context = torch.tensor([10]), torch.tensor([20, 21, 22, 2, 23])
    drafter = Drafter(DraftConfig(tokens=3, match=2), [source, source], eos_id=2, contexts=[context, context])
    drafter.advance(0, [10, 20], accepted=1)
    assert drafter.propose(0, room=8) == [21, 22]                # not [21, 22, 2]
    drafter.advance(1, [10, 22], accepted=1)
    assert drafter.propose(1, room=8) == []                      # "22" was followed by EOS


def test_draft_arguments_are_checked(model):
    for bad, key in ((dict(tokens=-1), "tokens"), (dict(match=0), "match")):
        with pytest.raises(ValueError, match=key):
            DraftConfig(**bad)
    runner = Runner(model, pad_id=PAD, eos_id=EOS, name="teacher")
    with pytest.raises(ValueError, match="drafter"):
        runner.generate(contexts(), GREEDY, generator=torch.Generator(), capture=False,
                        drafter=Drafter(DraftConfig(2), [torch.tensor([5])], EOS))
    with pytest.raises(ValueError, match="prefixes"):
        Drafter(DraftConfig(2), [torch.tensor([5])], EOS, prefixes=[0, 0])


def teacher_rollout(model, xs, changes):
    """The model's own greedy rollout (no EOS), with token changes {row: {position: token}} planted in it."""
    plain = Runner(model, pad_id=PAD, eos_id=-1, name="student").generate(
        xs, SamplingConfig(temperature=0.0, max_new_tokens=10), generator=torch.Generator(), capture=False)
    tokens = plain.tokens.clone()
    for b, planted in changes.items():
        for p, t in planted.items():
            tokens[b, p] = t
    return type(plain)(tokens=tokens, lengths=plain.lengths, logprobs=plain.logprobs, targets=None,
                       finished=plain.finished)


@pytest.mark.parametrize("tokens", [0, 1, 4])
@pytest.mark.parametrize("chunk", [None, 2])
def test_splice_continuation_with_drafts_equals_plain_decoding(model, chunk, tokens):
    """Teacher = the model, greedy; y_o = its own rollout with tokens changed at different places per row, cut
    at 1: the continuation leaves the scoring logits at a different step per row, then decodes (tokens 0) or
    verifies drafts from y_o; y_r must be y_o[:1] + the model's plain greedy continuation either way."""
    xs = contexts(seed=4)
    rollout = teacher_rollout(model, xs, {0: {2: 5}, 1: {5: 6, 7: 7}, 3: {1: 8}})

    def spike_at_1(start, stop, teacher_hidden):
        values = torch.zeros(teacher_hidden.shape[:2])
        if start <= 1 < stop:
            values[:, 1 - start] = 1.0
        return values

    counted = Counted(model)
    runner = Runner(counted, pad_id=PAD, eos_id=-1, name="teacher")
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    result = splice(runner, xs, rollout, spike_at_1, threshold=0.5, window=1, chunk=chunk, sampling=sampling,
                    generator=torch.Generator(), draft=DraftConfig(tokens) if tokens else None)
    heads = [torch.cat([x, rollout.tokens[b, :1]]) for b, x in enumerate(xs)]
    expected = Runner(model, pad_id=PAD, eos_id=-1, name="plain").generate(
        heads, sampling, generator=torch.Generator(), capture=False)
    for b, y_r in enumerate(result.tokens):
        assert torch.equal(y_r, torch.cat([rollout.tokens[b, :1], expected.tokens[b]]))
        torch.testing.assert_close(implied(model, result.targets[b]), fresh(model, xs[b], y_r), atol=ATOL, rtol=0)
    c = runner.counters
    assert c.rescore_forwards == c.rescore_tokens == 0
    assert c.prefill_tokens + c.decode_tokens + c.draft_tokens == counted.fed
    assert (c.draft_tokens > 0) == (tokens > 0) and c.accepted_tokens <= c.draft_tokens


# -- sampled: the output law is the model's own ------------------------------------------------------------------

SMALL_VOCAB = 7          # the model's logit columns; sampling is restricted to the first 6 (a padded vocabulary)
SAMPLED = 3              # generated tokens whose joint law is tested
ROWS = 3000              # independent rows per run (one batch)
ALPHA = 1e-3             # false-alarm rate of one chi-square test (a correct sampler fails on 0.1% of seeds)
Z_ALPHA = 3.0902         # the standard normal quantile 1 - ALPHA


def chi_square_threshold(df: int) -> float:
    """The chi-square quantile 1 - ALPHA with df degrees of freedom (Wilson-Hilferty; within 1% for df >= 3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + Z_ALPHA * math.sqrt(a)) ** 3


def chi_square(observed: dict, law: dict, count: int) -> tuple[float, int]:
    """Pearson's statistic of observed counts against count * law, cells expecting < 5 pooled into one."""
    expected = {k: count * p for k, p in law.items()}
    big = [k for k, e in expected.items() if e >= 5]
    small_expected = sum(e for k, e in expected.items() if e < 5)
    small_observed = sum(v for k, v in observed.items() if k not in big)
    stat = sum((observed.get(k, 0) - expected[k]) ** 2 / expected[k] for k in big)
    cells = len(big)
    if small_expected > 0:
        stat += (small_observed - small_expected) ** 2 / small_expected
        cells += 1
    elif small_observed:
        return math.inf, cells
    return stat, cells - 1


def exact_law(model, context, sampling, vocab_size, eos_id=None):
    """P(y_1 .. y_SAMPLED | context) under the filtered sampling distribution, by enumerating prefixes (fp64). A
    prefix ending in eos_id is a complete row: it keeps its probability and grows no further."""
    law, open_ = {}, {(): 1.0}
    for _ in range(SAMPLED):
        prefixes = list(open_)
        ids = torch.stack([torch.cat([context, torch.tensor(p, dtype=torch.int64)]) for p in prefixes])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        weights = filtered_weights(logits, sampling, vocab_size).double()
        probs = weights / weights.sum(-1, keepdim=True)
        grown = {p + (t,): open_[p] * float(probs[i, t]) for i, p in enumerate(prefixes)
                 for t in range(probs.shape[1]) if probs[i, t] > 0}
        law.update({p: q for p, q in grown.items() if p[-1] == eos_id})
        open_ = {p: q for p, q in grown.items() if p[-1] != eos_id}
    law.update(open_)
    return law


def counts(rollout):
    out: dict = {}
    for row in rollout.tokens[:, :SAMPLED].tolist():
        out[tuple(row)] = out.get(tuple(row), 0) + 1
    return out


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, max_new_tokens=SAMPLED),
                                      SamplingConfig(temperature=0.7, top_k=3, max_new_tokens=SAMPLED),
                                      SamplingConfig(temperature=1.3, top_p=0.8, max_new_tokens=SAMPLED)],
                         ids=["plain", "top_k", "top_p"])
def test_sampled_drafts_keep_the_sampling_distribution(sampling):
    model = tiny_lm("llama", seed=5, vocab=SMALL_VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)   # spread-out distributions, so acceptance and rejection both happen
    vocab = SMALL_VOCAB - 1
    context = torch.tensor([3, 4, 5, 1])
    law = exact_law(model, context, sampling, vocab)
    likely = max(law, key=law.get)
    sources = [torch.tensor(likely), torch.tensor([0, 1, 5]), torch.tensor([likely[0], 6, likely[2]])]
    runner = Runner(model, pad_id=PAD, eos_id=-1, name="teacher", vocab_size=vocab)
    xs = [context] * ROWS
    plain = runner.generate(xs, sampling, generator=torch.Generator().manual_seed(11), capture=False)
    drafted_runner = Runner(model, pad_id=PAD, eos_id=-1, name="teacher", vocab_size=vocab)
    drafted = drafted_runner.generate(xs, sampling, generator=torch.Generator().manual_seed(12),
                                      capture=False,
                                      drafter=Drafter(DraftConfig(2), [sources[i % 3] for i in range(ROWS)], -1))
    c = drafted_runner.counters
    assert 0.02 < c.acceptance < 0.98 and c.forwards <= runner.counters.forwards
    for rollout in (plain, drafted):
        assert (rollout.tokens < vocab).all()
        stat, df = chi_square(counts(rollout), law, ROWS)
        assert df >= 3 and stat < chi_square_threshold(df), (stat, df)
    if sampling.top_k or sampling.top_p < 1:  # the test sees the filter: the unfiltered law is rejected
        unfiltered = exact_law(model, context, SamplingConfig(temperature=sampling.temperature), vocab)
        stat, df = chi_square(counts(drafted), unfiltered, ROWS)
        assert stat > chi_square_threshold(df)


def test_looked_up_drafts_and_stopped_rows_keep_the_sampling_distribution(monkeypatch):
    """Rows whose source is used up draft from their context (Lookup), and rows that stop at EOS stay in the batch,
    fed nothing, until they are FINISHED_SHARE of it: the other rows' output law is still the model's own."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=SAMPLED)
    model = tiny_lm("llama", seed=5, vocab=SMALL_VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    vocab, eos = SMALL_VOCAB - 1, 2
    context = torch.tensor([3, 4, 5, 3, 4, 1, 3])     # its last token occurred before: a looked-up draft from the start
    law = exact_law(model, context, sampling, vocab, eos)
    assert 0.1 < sum(q for p, q in law.items() if len(p) < SAMPLED) < 0.9   # rows stop early, and not all of them
    sources = [torch.tensor([], dtype=torch.int64), torch.tensor([4]), torch.tensor([5, 0])]
    looked_up = []
    follow = Lookup.follow
    monkeypatch.setattr(Lookup, "follow", lambda self, count: looked_up.append(follow(self, count)) or looked_up[-1])
    runner = Runner(model, pad_id=PAD, eos_id=eos, name="teacher", vocab_size=vocab)
    drafter = Drafter(DraftConfig(2), [sources[i % 3] for i in range(ROWS)], eos, contexts=[context] * ROWS)
    drafted = runner.generate([context] * ROWS, sampling, generator=torch.Generator().manual_seed(13), capture=False,
                              drafter=drafter)
    c = runner.counters
    assert sum(map(len, looked_up)) > ROWS // 2 and 0.02 < c.acceptance < 0.98   # many drafts were looked up
    observed: dict = {}
    for row in rows(drafted):
        observed[tuple(row.tolist())] = observed.get(tuple(row.tolist()), 0) + 1
    assert set(observed) <= set(law)
    stat, df = chi_square(observed, law, ROWS)
    assert df >= 3 and stat < chi_square_threshold(df), (stat, df)


# -- the shipped task ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    def config(mode, tokens):
        return from_dict({
            "model": {"student": str(checkpoint_dir("student")), "teacher": str(checkpoint_dir("teacher"))},
            "data": {"task": "chain", "train_examples": 12},
            "rollout": {"max_new_tokens": 40},
            "distill": {"mode": mode, "draft_tokens": tokens},
            "run": {"progress": False}})
    engine = build_engine(config("trd", 0))
    return config, engine


@pytest.mark.parametrize("mode", ["trd", "trd_splice"])
def test_shipped_task_refinement_is_the_same_with_drafts(shipped, mode):
    config, engine = shipped
    task = ChainTask()
    tokenize = Tokenize(engine.tokenizer)
    examples = list(task.examples("train", 12, 0))
    batches, counters = {}, {}
    for tokens in (0, 1, 4, 16):
        engine.student.new_step()
        engine.teacher.new_step()
        batches[tokens], _ = build_batch(BatchRequest(config(mode, tokens), task, tokenize, engine.student,
                                                      engine.teacher, torch.Generator().manual_seed(2), examples,
                                                      list(range(12))))
        counters[tokens] = engine.teacher.counters
    plain = batches[0]
    for tokens in (1, 4, 16):
        batch, c = batches[tokens], counters[tokens]
        assert all(torch.equal(a, b) for a, b in zip(batch.originals, plain.originals))
        assert all(torch.equal(a, b) for a, b in zip(batch.completions, plain.completions))
        for a, b in zip(batch.targets, plain.targets):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert c.rescore_forwards == 0 and c.accepted_tokens > 0
        assert c.forwards < counters[0].forwards
    assert counters[0].draft_tokens == 0
    if mode == "trd":   # the rewrite's targets are a one-pass teacher forward over (refine prompt, y_r)
        b = 0
        context = tokenize(task.refine_prompt(examples[b], tokenize.text(plain.originals[b]), False))
        torch.testing.assert_close(implied(engine.teacher.model, batches[16].targets[b]),
                                   fresh(engine.teacher.model, context, batches[16].completions[b]),
                                   atol=1e-4, rtol=1e-4)


def test_a_rewrite_past_a_short_attempt_drafts_from_its_prompt(shipped):
    """Attempts that stopped at once ("10"): y_o gives no draft past its one token; the rewrite repeats stretches
    of the refine prompt (the operations and operands), so drafts looked up there are accepted. Greedy output
    and targets stay plain decoding's; rows finish at different forwards (some stay idle in the batch)."""
    _, engine = shipped
    task, tokenize, teacher = ChainTask(), Tokenize(engine.tokenizer), engine.teacher
    examples = list(task.examples("train", 12, 0))
    contexts = [tokenize(task.refine_prompt(e, "10", False)) for e in examples]
    attempts = [tokenize("10")] * len(examples)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=40)
    outputs, counters = {}, {}
    for looked_up in (None, False, True):
        teacher.new_step()
        drafter = None if looked_up is None else Drafter(DraftConfig(3), attempts, teacher.eos_id,
                                                         contexts=contexts if looked_up else None)
        outputs[looked_up] = teacher.generate(contexts, sampling, generator=torch.Generator(), capture=True,
                                              drafter=drafter)
        counters[looked_up] = teacher.counters
    plain = outputs[None]
    assert len(set(plain.lengths.tolist())) > 1
    for looked_up in (False, True):
        assert torch.equal(outputs[looked_up].tokens, plain.tokens)
        assert torch.equal(outputs[looked_up].lengths, plain.lengths)
        for a, b in zip(outputs[looked_up].targets, plain.targets):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert counters[looked_up].rescore_forwards == 0
    assert counters[True].accepted_tokens > counters[False].accepted_tokens
    assert counters[True].forwards < counters[False].forwards
