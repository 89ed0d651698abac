"""bench/draft_replay.py replays drafting policies on recorded rewrites: its replay of the shipped drafter needs the
forwards (and feeds the decode tokens) the drafted rewrite measured, the student's picks are its teacher-forced
argmax, and a student draft that is always right needs ceil(len / (D + 1)) forwards per row. Its bound for drafters
that copy runs is the fewest forwards found by searching every choice of accepted length."""

import functools
import math
import random

import pytest

from bench.draft_replay import copy_bound, fewest_copy_forwards, forwards, longest_copy, recorded, replay
from bench.engine_step import DRAFT, one_step

EOS = 2


@pytest.fixture(scope="module")
def batches():
    return recorded(batches=2, batch_size=4)


def test_the_replayed_drafter_needs_the_measured_forwards(batches):
    steps, picks, eos = batches
    for seed, (step, p) in enumerate(zip(steps, picks)):
        measured = one_step("trd", 0, DRAFT, batch_size=4, device="cpu", seed=seed)
        replayed = replay(step, p, DRAFT, "rollout", eos)
        assert replayed["forwards"] == measured["teacher_forwards"]
        # every forward after a row's first feeds it one generated token
        assert replayed["row_forwards"] - len(step["y_r"]) == measured["teacher_decode_tokens"]
        assert replayed["student_forwards"] == 0


def test_the_student_picks_are_its_teacher_forced_argmax(batches):
    steps, picks, _ = batches
    pairs = [(a, b) for step, p in zip(steps, picks) for pick, y in zip(p, step["y_r"]) for a, b in zip(pick, y)]
    assert [len(p) for p in picks[0]] == [len(y) for y in steps[0]["y_r"]]
    assert sum(a == b for a, b in pairs) / len(pairs) > 0.8     # 0.95 measured here; a position off, 0.0


def test_a_student_draft_that_is_always_right(batches):
    step = batches[0][0]
    perfect = [list(y) for y in step["y_r"]]                        # the student picks y_r's every token
    for tokens in (1, 3, 8):
        result = replay(step, perfect, tokens, "student", batches[2])
        rounds = max(math.ceil(len(y) / (tokens + 1)) for y in step["y_r"])
        assert result["forwards"] == rounds
        assert result["row_forwards"] == sum(math.ceil(len(y) / (tokens + 1)) for y in step["y_r"])
        assert result["student_forwards"] == tokens * rounds


def test_a_student_pick_that_is_wrong_ends_its_draft():
    y = list(range(10, 20)) + [EOS]                                 # 11 tokens, EOS last
    picks = y[:5] + [99] + y[6:]                                    # wrong at position 5
    step = {"y_o": [[]], "refine": [[30, 31]], "y_r": [y], "budget": 40}
    # drafts of 3: y0-y2 accepted + y3; y4 accepted, 99 rejected + y5; y6-y8 + y9; nothing + EOS
    assert replay(step, [picks], 3, "student", EOS) == {"forwards": 4, "row_forwards": 4, "student_forwards": 12}
    assert replay(step, [y], 3, "student", EOS)["forwards"] == 3
    written = []
    assert forwards(y, lambda position, room: [], lambda tokens, accepted: written.extend(tokens), EOS, 40) == 11
    assert written == y                                             # no draft: one token per forward
    with pytest.raises(ValueError, match="drafts"):
        replay(step, [y], 3, "oracle", EOS)


def test_the_copy_bound_by_hand():
    y = [5, 6, 7, 8, 9, EOS]
    # drafts of 3 copied from the source: 5 6 7 accepted + 8; 9 accepted + EOS (the last token is the teacher's)
    assert fewest_copy_forwards(y, [5, 6, 7, 1, 8, 9], 3, output=False) == 2
    assert fewest_copy_forwards(y, [], 3, output=False) == len(y)              # nothing to copy: plain decoding
    repeated = [1, 2, 3, 1, 2, 3, EOS]
    assert fewest_copy_forwards(repeated, [], 3, output=False) == 7
    assert fewest_copy_forwards(repeated, [], 3, output=True) == 4              # 1, 2, 3, then 1 2 3 copied + EOS
    assert longest_copy([7, 8, 9], 0, [7, 8, 0, 7, 8, 9], 3) == 3


def test_the_copy_bound_is_the_fewest_forwards_of_any_copying_drafter():
    rng = random.Random(0)
    for _ in range(300):
        y = [rng.randrange(4) for _ in range(rng.randrange(1, 12))] + [EOS]
        source = [rng.randrange(4) for _ in range(rng.randrange(0, 10))]
        tokens, output = rng.choice((1, 2, 3, 8)), rng.random() < 0.5

        @functools.cache
        def fewest(position: int) -> int:   # every accepted length a copied run allows, searched
            if position >= len(y):
                return 0
            text = source + ([-1] + y[:position] if output else [])
            longest = longest_copy(y, position, text, min(tokens, len(y) - 1 - position))
            return 1 + min(fewest(position + accepted + 1) for accepted in range(longest + 1))

        assert fewest_copy_forwards(y, source, tokens, output=output) == fewest(0)


def test_the_copy_bound_of_a_batch(batches):
    step = batches[0][0]
    narrow, wide = copy_bound(step, 3, "y_o"), copy_bound(step, 3, "y_o+context+output")
    perfect = [math.ceil(len(y) / 4) for y in step["y_r"]]          # every draft of 3 accepted
    for bound in (narrow, wide):
        assert max(perfect) <= bound["forwards"] <= max(map(len, step["y_r"]))
        assert sum(perfect) <= bound["row_forwards"] <= sum(map(len, step["y_r"]))
    assert wide["row_forwards"] <= narrow["row_forwards"] and wide["forwards"] <= narrow["forwards"]
    assert copy_bound(step, 40, "y_o")["row_forwards"] <= narrow["row_forwards"]
    with pytest.raises(ValueError, match="sources"):
        copy_bound(step, 3, "y_r")
