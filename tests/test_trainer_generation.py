"""Runner.generate / Runner.score / splice on tiny random Llama and Qwen3 models: captured hidden states give
the logits of fresh forwards (padding, positions and KV reuse are exact), EOS stopping, determinism, the
re-scoring ledger, and TRD-splice's failure points, refined rows, targets and token counts, in one pass and in
chunks."""

from __future__ import annotations

import weakref

import pytest
import torch

import trd_fast
from tiny_models import PAD, VOCAB, fresh, implied, tiny_lm
from trd_fast.trainer.rollout.generation import Rollout, Runner, SamplingConfig
from trd_fast.trainer.rollout.draft import DraftConfig, Drafter
from trd_fast.trainer.rollout.kv_cache import CachedBatch
from trd_fast.trainer.rollout.sampling import sample
from trd_fast.trainer.refine.splice import splice

EOS = 2
CONTEXT_LENGTHS = (3, 8, 1, 5)
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def student(family):
    return tiny_lm(family, seed=1)


@pytest.fixture(scope="module")
def teacher(family):
    return tiny_lm("qwen3" if family == "llama" else "llama", seed=2, vocab=VOCAB + 8)  # padded vocabulary


def contexts(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in CONTEXT_LENGTHS]


def rows(tokens, lengths):
    return [tokens[b, :n] for b, n in enumerate(lengths.tolist())]


def rollout_with_early_eos(model, xs, seed=0, max_new=10, **sampling):
    """Sample once with no EOS, then again with the same seed and EOS = row 0's third token: row 0 then stops at
    or before its third token while the others go on (every row drew the same numbers up to that point)."""
    config = SamplingConfig(max_new_tokens=max_new, **sampling)
    probe = Runner(model, pad_id=PAD, eos_id=-1, name="probe")
    first = probe.generate(xs, config, generator=torch.Generator().manual_seed(seed), capture=False)
    eos = int(first.tokens[0, 2])
    runner = Runner(model, pad_id=PAD, eos_id=eos, name="student")
    out = runner.generate(xs, config, generator=torch.Generator().manual_seed(seed), capture=True)
    return runner, out, eos


def test_generate_captures_exact_logits(student):
    xs = contexts()
    runner, out, eos = rollout_with_early_eos(student, xs, top_k=20, top_p=0.95)
    lengths = out.lengths.tolist()
    assert lengths[0] <= 3 and out.finished[0] and max(lengths) == 10
    assert out.tokens.shape == out.logprobs.shape == (4, 10)
    for b, n in enumerate(lengths):
        y = out.tokens[b, :n]
        expected = fresh(student, xs[b], y)
        assert out.targets[b].shape == (n, student.config.hidden_size)
        torch.testing.assert_close(implied(student, out.targets[b]), expected, atol=ATOL, rtol=0)
        logp = torch.log_softmax(expected, -1).gather(-1, y[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[b, :n], logp, atol=ATOL, rtol=0)
        assert (out.tokens[b, n:] == PAD).all() and (out.logprobs[b, n:] == 0).all()
        assert bool(out.finished[b]) == (int(y[-1]) == eos)
        assert (y[:-1] != eos).all()
    c = runner.counters
    assert c.prefill_tokens == sum(CONTEXT_LENGTHS)
    assert c.decode_tokens == sum(n - 1 for n in lengths) and c.forwards == 1 + max(lengths) - 1
    assert c.rescore_forwards == c.rescore_tokens == 0


def test_decode_frees_the_cache_that_rows_left(student, monkeypatch):
    """After finished rows are dropped (a copy of the others' cache), the old cache's tensors are gone before the
    next forward: neither the last forward's output nor the caller's first batch keeps them alive (plain decoding,
    whose first batch generate holds; and drafted generation)."""
    left: list[weakref.ref] = []
    select, backbone = CachedBatch.select, Runner.backbone

    def recorded_select(self, rows):
        for layer in self.cache.layers:
            left.extend(weakref.ref(t if t._base is None else t._base) for t in (layer.keys, layer.values))
        return select(self, rows)

    def checked_backbone(self, **inputs):
        assert all(ref() is None for ref in left), "keys or values the rows left are alive at the next forward"
        return backbone(self, **inputs)

    monkeypatch.setattr(CachedBatch, "select", recorded_select)
    monkeypatch.setattr(Runner, "backbone", checked_backbone)
    xs = contexts()
    runner, out, _ = rollout_with_early_eos(student, xs)
    assert left                                             # row 0 stopped early: rows were dropped
    left.clear()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)    # drafted: the same tokens as plain decoding, so
    plain = Runner(student, pad_id=PAD, eos_id=-1, name="probe").generate(     # EOS = row 0's third greedy token
        xs, greedy, generator=torch.Generator(), capture=False)               # stops it while the others go on
    drafted = Runner(student, pad_id=PAD, eos_id=int(plain.tokens[0, 2]), name="teacher").generate(
        xs, greedy, generator=torch.Generator(), capture=False,
        drafter=Drafter(DraftConfig(tokens=2), plain.rows(), int(plain.tokens[0, 2])))
    assert drafted.lengths[0] <= 3 < drafted.lengths.max()
    assert left                                             # a quarter of the rows stopped: they were dropped


def test_generate_is_deterministic_and_greedy_is_argmax(student):
    xs = contexts(seed=1)
    runner = Runner(student, pad_id=PAD, eos_id=EOS, name="student")
    config = SamplingConfig(temperature=0.7, max_new_tokens=8)
    a, b, c = (runner.generate(xs, config, generator=torch.Generator().manual_seed(s), capture=False)
               for s in (5, 5, 6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    greedy = runner.generate(xs, SamplingConfig(temperature=0.0, max_new_tokens=8),
                             generator=torch.Generator().manual_seed(0), capture=True)
    for b, n in enumerate(greedy.lengths.tolist()):
        assert torch.equal(greedy.tokens[b, :n], implied(student, greedy.targets[b]).argmax(-1))
    one = runner.generate(xs, SamplingConfig(temperature=0.0, max_new_tokens=1), generator=torch.Generator(),
                          capture=False, progress="rollout")
    assert torch.equal(one.tokens, greedy.tokens[:, :1]) and (one.lengths == 1).all()


def test_sample_filters():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, SamplingConfig(top_k=1), generator), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(top_p=1e-6), generator), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        drawn = sample(logits, SamplingConfig(top_k=3, temperature=2.0), generator)
        assert (top3 == drawn[:, None]).any(-1).all()
    assert (sample(logits, SamplingConfig(temperature=5.0), generator, vocab_size=7) < 7).all()
    assert (sample(logits, SamplingConfig(temperature=0.0), generator, vocab_size=7)
            == logits[:, :7].argmax(-1)).all()
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


def test_score_matches_fresh_forwards_and_ledger_counts_rescoring(student):
    xs = contexts(seed=2)
    ys = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 1, 6, 0)]
    runner = Runner(student, pad_id=PAD, eos_id=EOS, name="teacher")
    scored = runner.score(xs, ys)
    assert scored.shape == (4, 6, student.config.hidden_size)
    for b, y in enumerate(ys):
        torch.testing.assert_close(implied(student, scored[b, :len(y)]), fresh(student, xs[b], y), atol=ATOL, rtol=0)
        assert (scored[b, len(y):] == 0).all()
    fed = sum(len(x) + max(len(y) - 1, 0) for x, y in zip(xs, ys))
    assert runner.counters.prefill_tokens == fed and runner.counters.rescore_tokens == 0
    runner.score(xs, ys, row_ids=[10, 11, 12, 13])   # other rows: new work
    assert runner.counters.rescore_forwards == 0
    runner.score(xs, ys)                             # the same rows again: all re-scored
    assert runner.counters.rescore_forwards == 1 and runner.counters.rescore_tokens == fed
    runner.new_step()
    runner.score(xs, ys)
    assert runner.counters.rescore_tokens == 0 and runner.counters.forwards == 1


def test_ledger_after_generate(student):
    xs = contexts(seed=3)
    same = [xs[0], xs[0]]
    runner = Runner(student, pad_id=PAD, eos_id=EOS, name="student")
    out = runner.generate(same, SamplingConfig(max_new_tokens=6), generator=torch.Generator().manual_seed(0),
                          capture=False, row_ids=[7, 7])
    assert runner.counters.rescore_tokens == 0  # two rows of one forward do not count each other
    ys = rows(out.tokens, out.lengths)
    runner.score([xs[0]], [ys[0]], row_ids=[7])
    assert runner.counters.rescore_tokens == len(xs[0]) + len(ys[0]) - 1
    assert runner.counters.rescore_forwards == 1


def planted_rollout(xs):
    """y_o rows of lengths 3, 10, 9, 7, 10 (random tokens) and a signal offset that plants failures at
    k = none, 7, 8 (y_o's last token), 6 (its last), 1: with chunk 2 rows leave the scoring batch in three
    different rounds, some after a round that scored them fewer than 2 positions."""
    lengths, cuts = [3, 10, 9, 7, 10], [None, 7, 8, 6, 1]
    generator = torch.Generator().manual_seed(7)
    tokens = torch.full((len(lengths), 10), PAD)
    offset = torch.full(tokens.shape, -1000.0)
    for b, (n, k) in enumerate(zip(lengths, cuts)):
        tokens[b, :n] = torch.randint(3, VOCAB, (n,), generator=generator)
        if k is not None:
            offset[b, k] = 1000.0
    rollout = Rollout(tokens=tokens, lengths=torch.tensor(lengths), logprobs=torch.zeros(tokens.shape),
                      targets=None, finished=torch.zeros(len(lengths), dtype=torch.bool))
    return rollout, offset


def nll_signal(rollout, teacher, offset=None):
    """The teacher's NLL of each y_o token (plus a planted offset) from its hidden states."""
    def signal(start, stop, teacher_hidden):
        nll = -trd_fast.token_logprobs(implied(teacher, teacher_hidden), rollout.tokens[:, start:stop])
        return nll if offset is None else nll + offset[:, start:stop]
    return signal


def replay_end(y_r, y_o, k, scored):
    """Where the teacher stops drawing from its scoring logits: past the tokens that agree with y_o."""
    p = k
    while p + 1 < len(y_r) and int(y_r[p]) == int(y_o[p]) and p + 1 < scored:
        p += 1
    return p


@pytest.mark.parametrize("chunk", [None, 2])
def test_splice(teacher, chunk):
    xs = contexts(seed=4) + [torch.tensor([5, 6])]
    rollout, offset = planted_rollout(xs)
    ys = rows(rollout.tokens, rollout.lengths)
    full = torch.zeros(rollout.tokens.shape)
    for b, y in enumerate(ys):
        full[b, :len(y)] = -torch.log_softmax(fresh(teacher, xs[b], y), -1).gather(-1, y[:, None])[:, 0]
    full += offset
    expected_cut = trd_fast.prefix_scan(full, rollout.lengths, threshold=0.0, window=2)[1]
    assert expected_cut.tolist() == [3, 7, 8, 6, 1]
    runner = Runner(teacher, pad_id=PAD, eos_id=EOS, name="teacher", vocab_size=VOCAB)
    result = splice(runner, xs, rollout, nll_signal(rollout, teacher, offset), threshold=0.0, window=2, chunk=chunk,
                    sampling=SamplingConfig(max_new_tokens=7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.cut, expected_cut)
    assert result.failed.tolist() == [False, True, True, True, True]
    expected_scored = [3, 10, 9, 7, 10] if chunk is None else [3, 8, 9, 7, 2]
    assert result.scored.tolist() == expected_scored
    prefill = decode = 0
    for b, (y_o, y_r, k, scored) in enumerate(zip(ys, result.tokens, result.cut.tolist(), expected_scored)):
        assert torch.equal(y_r[:k], y_o[:k])
        torch.testing.assert_close(implied(teacher, result.targets[b]), fresh(teacher, xs[b], y_r), atol=ATOL, rtol=0)
        torch.testing.assert_close(result.signal[b, :scored], full[b, :scored], atol=1e-4, rtol=0)
        assert (result.signal[b, scored:] == 0).all()
        if result.failed[b]:
            assert 1 <= len(y_r) - k <= 7 and (y_r < VOCAB).all()
            decode += len(y_r) - 1 - replay_end(y_r, y_o, k, scored)
        else:
            assert torch.equal(y_r, y_o)
        prefill += len(xs[b]) + scored - 1
    c = runner.counters
    assert c.prefill_tokens == prefill and c.decode_tokens == decode
    assert c.rescore_forwards == c.rescore_tokens == 0
    runner.score(xs, result.tokens)  # a deliberate re-score is seen
    assert c.rescore_forwards == 1 and c.rescore_tokens > 0


@pytest.mark.parametrize("chunk", [None, 3])
def test_splice_where_the_teacher_agrees_feeds_nothing_twice(student, chunk):
    """Teacher = student, both greedy: the continuation redraws y_o itself, from the scoring logits, and feeds
    only what scoring never fed (the last y_o token on), then runs on to its own budget."""
    xs = contexts(seed=5)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    rollout = Runner(student, pad_id=PAD, eos_id=-1, name="student").generate(
        xs, greedy, generator=torch.Generator(), capture=False)

    def spike_at_1(start, stop, teacher_hidden):
        values = torch.zeros(teacher_hidden.shape[:2])
        if start <= 1 < stop:
            values[:, 1 - start] = 1.0
        return values

    runner = Runner(student, pad_id=PAD, eos_id=-1, name="teacher")
    result = splice(runner, xs, rollout, spike_at_1, threshold=0.5, window=1, chunk=chunk,
                    sampling=SamplingConfig(temperature=0.0, max_new_tokens=9),
                    generator=torch.Generator())
    assert (result.cut == 1).all() and result.failed.all()
    for b, y_r in enumerate(result.tokens):
        assert len(y_r) == 1 + 9 and torch.equal(y_r[:6], rollout.tokens[b])
        torch.testing.assert_close(implied(student, result.targets[b]), fresh(student, xs[b], y_r), atol=ATOL, rtol=0)
    c = runner.counters
    scored = result.scored.tolist()
    assert scored == [6] * 4 if chunk is None else scored == [3] * 4
    assert c.prefill_tokens == sum(len(x) + s - 1 for x, s in zip(xs, scored))
    assert c.decode_tokens == sum(len(y) - 1 - (s - 1) for y, s in zip(result.tokens, scored))
    assert c.rescore_forwards == c.rescore_tokens == 0


def test_splice_rejects_bad_arguments(student):
    xs = contexts()
    runner = Runner(student, pad_id=PAD, eos_id=EOS, name="teacher")
    rollout = runner.generate(xs, SamplingConfig(max_new_tokens=3), generator=torch.Generator(),
                              capture=False)
    kwargs = dict(threshold=1.0, window=1, chunk=None, sampling=SamplingConfig(), generator=torch.Generator())
    with pytest.raises(ValueError, match="contexts"):
        splice(runner, xs[:2], rollout, nll_signal(rollout, student), **kwargs)
    with pytest.raises(ValueError, match="chunk"):
        splice(runner, xs, rollout, nll_signal(rollout, student), **{**kwargs, "chunk": 0})
    with pytest.raises(ValueError, match="signal_fn"):
        splice(runner, xs, rollout, lambda start, stop, hidden: hidden[:, :, 0].sum(-1), **kwargs)
    with pytest.raises(ValueError, match=r"contexts\[1\]"):
        runner.generate([xs[0], xs[1][:0]], SamplingConfig(), generator=torch.Generator(), capture=False)


def test_sliding_window_models_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0)
    runner = Runner(Qwen2ForCausalLM(config).eval(), pad_id=PAD, eos_id=EOS, name="teacher")
    with pytest.raises(ValueError, match="teacher: only full-attention"):
        runner.generate(contexts(), SamplingConfig(max_new_tokens=2), generator=torch.Generator(),
                        capture=False)
