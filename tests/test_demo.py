"""A two-step miniature of `make demo` on the shipped models: the report's shape, the curves, and a rerun
that reuses finished runs instead of training them again."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from trd_fast.drivers import demo
from trd_fast.drivers.demo import METHODS
from trd_fast.trainer.run.checkpoint import CHECKPOINT


def miniature(output, jobs):
    parser = demo.add_arguments(argparse.ArgumentParser())
    return parser.parse_args(["--output", str(output), "--seeds", "0", "1", "--steps", "2", "--batch-size", "4",
                              "--eval-problems", "24", "--curve-every", "1", "--curve-problems", "8",
                              "--no-progress", "--jobs", str(jobs)])


def test_demo_miniature_writes_the_report_and_resumes(tmp_path):
    report = demo.run(miniature(tmp_path, jobs=2))  # the runs in two processes
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["seeds"] == [0, 1] and on_disk["eval_problems"] == 24
    assert on_disk["setup"]["runs_trained_with"] == [{"threads": max(1, demo._cores() // 2), "jobs": 2}]
    assert set(on_disk["methods"]) == {"base", *METHODS}
    for method, entry in on_disk["methods"].items():
        assert len(entry["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in entry["accuracy"])
    base = json.loads((tmp_path / "base.json").read_text())
    assert on_disk["methods"]["base"]["accuracy"] == [base["accuracy"]] * 2 and base["problems"] == 24
    for method in METHODS:
        cost = on_disk["cost"][method]
        assert cost["wall_s"] > 0 and cost["teacher_tokens"] > 0
        lines = (tmp_path / method / "seed-1" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert on_disk["cost"]["trd"]["teacher_rescore_forwards"] == 0
    assert on_disk["cost"]["trd_splice"]["teacher_rescore_forwards"] == 0
    refinement = on_disk["refinement"]
    for key in ("y_o_accuracy", "y_r_accuracy", "y_o_len", "y_r_len", "fail_to_pass", "pass_to_fail",
                "prefix_failure_rate"):
        assert 0.0 <= refinement[key] < 100.0
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    finished = {m: (tmp_path / m / "seed-0" / "final.json").stat().st_mtime_ns for m in METHODS}
    again = demo.run(miniature(tmp_path, jobs=1))
    assert {m: (tmp_path / m / "seed-0" / "final.json").stat().st_mtime_ns for m in METHODS} == finished
    assert again["methods"] == report["methods"]


def test_demo_refuses_no_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        miniature(tmp_path, jobs=0)
    assert "--jobs: must be >= 1, got 0" in capsys.readouterr().err


def test_a_failed_run_stops_the_demo_with_its_error(tmp_path):
    """A run that fails in its worker process ends the demo with that run's error, and writes no report (both runs
    fail at once here, so the test waits for no healthy run to finish)."""
    for method in ("opd", "trd"):
        broken = tmp_path / method / "seed-0"
        broken.mkdir(parents=True)
        (broken / CHECKPOINT).write_bytes(b"not a checkpoint")
    args = miniature(tmp_path, jobs=2)
    args.seeds, args.methods = [0], ["opd", "trd"]
    with pytest.raises(ValueError, match=r"checkpoint .*(opd|trd).seed-0.checkpoint\.pt cannot be read"):
        demo.run(args)
    assert not (tmp_path / "report.json").exists()


def test_an_unfinished_run_started_with_other_arguments_says_how_to_go_on(tmp_path):
    args = miniature(tmp_path, jobs=1)
    args.seeds, args.methods = [0], ["opd"]
    started = argparse.Namespace(**{**vars(args), "steps": 20})           # its warmup was 2 steps, now it is 1
    run_dir = tmp_path / "opd" / "seed-0"
    run_dir.mkdir(parents=True)
    torch.save({"model": {}, "config": demo.run_config(started, "opd", 0).to_dict()}, run_dir / CHECKPOINT)
    with pytest.raises(ValueError, match=r"^config optim\.warmup_steps: 1 here but 2 in the config that trained the "
                                         r"checkpoint .*; an unfinished demo run resumes only with the arguments that "
                                         r"started it: rerun with those, remove .*opd.seed-0, or use another --output"):
        demo.run(args)
