"""bench/draft_replay.py replays drafting policies on recorded rewrites: its replay of the shipped drafter needs the
forwards (and feeds the decode tokens) the drafted rewrite measured, the student's picks are its teacher-forced
argmax, and a student draft that is always right needs ceil(len / (D + 1)) forwards per row."""

import math

import pytest

from bench.draft_replay import forwards, recorded, replay
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
