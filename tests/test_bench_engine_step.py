"""bench/engine_step.py's step runs on the shipped task as configured (its config passes the data check against
the shipped models), and on one batch the drafted trd step writes the same rewrite as plain decoding in fewer
teacher forwards, re-scoring nothing."""

import torch

from bench.engine_step import DRAFT, one_step


def test_the_bench_step_runs_and_drafting_keeps_the_rewrite():
    torch.manual_seed(0)
    plain, drafted = (one_step("trd", 0, draft, batch_size=4, device="cpu") for draft in (0, DRAFT))
    assert plain["trained_tokens"] == drafted["trained_tokens"] > 0      # greedy teacher: the same y_r
    assert plain["y_r_len"] == drafted["y_r_len"]
    assert plain["teacher_rescore_forwards"] == drafted["teacher_rescore_forwards"] == 0
    assert drafted["teacher_draft_tokens"] > 0 == plain["teacher_draft_tokens"]
    assert drafted["teacher_forwards"] < plain["teacher_forwards"]
