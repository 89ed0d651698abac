"""bench/engine_step.py's step runs on the shipped task as configured (its config passes the data check against
the shipped models), and on one batch the drafted trd step writes the same rewrite as plain decoding in fewer
teacher forwards, re-scoring nothing; the rewrite splits into the teacher model's forwards and the host's work."""

import pytest
import torch

from bench.engine_step import DRAFT, attribute, forwards_over_batches, measure, one_step


def test_the_bench_step_runs_and_drafting_keeps_the_rewrite():
    torch.manual_seed(0)
    plain, drafted = (one_step("trd", 0, draft, batch_size=4, device="cpu") for draft in (0, DRAFT))
    assert plain["trained_tokens"] == drafted["trained_tokens"] > 0      # greedy teacher: the same y_r
    assert plain["y_r_len"] == drafted["y_r_len"]
    assert plain["teacher_rescore_forwards"] == drafted["teacher_rescore_forwards"] == 0
    assert drafted["teacher_draft_tokens"] > 0 == plain["teacher_draft_tokens"]
    assert drafted["teacher_forwards"] < plain["teacher_forwards"]


def test_the_rewrite_splits_into_the_teacher_model_and_the_host():
    plain, drafted = (split for split in attribute(batch_size=4, device="cpu", tries=1) if split["mode"] != "opd")
    for split in (plain, drafted):
        assert 0 < split["teacher_model_s"] <= split["refine_s"]                # every teacher forward is in refine
        assert split["refine_host_s"] == split["refine_s"] - split["teacher_model_s"]
    assert drafted["teacher_forwards"] < plain["teacher_forwards"]


def test_forwards_are_counted_over_batches():
    spread = forwards_over_batches(batch_size=4, device="cpu", batches=2)
    plain, drafted = spread["trd (plain decoding)"], spread[f"trd (drafts of {DRAFT})"]
    assert spread["seeds"] == [0, 1] and len(plain) == len(drafted) == 2
    assert all(0 < d < p for d, p in zip(drafted, plain))


def test_each_run_is_timed_against_opd_in_its_own_round():
    rows = {r["mode"]: r for r in measure(repeats=1, batch_size=4, device="cpu")}
    opd = rows["opd"]
    assert opd["step_over_opd_paired"] == 1.0
    for row in rows.values():                           # one round: its ratio is the ratio of the two steps
        assert row["step_over_opd_paired"] == pytest.approx(row["step_s"] / opd["step_s"])
