"""bench/draft_replay.py replays drafting policies on recorded rewrites: its replay of the shipped drafter gives the
forwards the drafted rewrite measured, and a student draft that is always right needs ceil(len / (D + 1))."""

import math

from bench.draft_replay import recorded, replay
from bench.engine_step import DRAFT, forwards_over_batches


def test_the_replayed_drafter_needs_the_measured_forwards():
    steps, picks, eos = recorded(batches=2, batch_size=4)
    replayed = [replay(step, p, DRAFT, "rollout", eos)["forwards"] for step, p in zip(steps, picks)]
    assert replayed == forwards_over_batches(batch_size=4, device="cpu", batches=2)[f"trd (drafts of {DRAFT})"]


def test_a_student_draft_that_is_always_right():
    steps, _, eos = recorded(batches=1, batch_size=4)
    step = steps[0]
    perfect = [list(y) for y in step["y_r"]]                        # the student picks y_r's every token
    for tokens in (1, 3, 8):
        result = replay(step, perfect, tokens, "student", eos)
        rounds = max(math.ceil(len(y) / (tokens + 1)) for y in step["y_r"])
        assert result["forwards"] == rounds
        assert result["row_forwards"] == sum(math.ceil(len(y) / (tokens + 1)) for y in step["y_r"])
        assert result["student_forwards"] == tokens * rounds
