"""One training step of each mode on the shipped task's models and the same batch: time per phase and the
token counters (teacher prefill and decode apart, re-scoring forwards).

    .venv/bin/python -m bench.engine_step            # -> bench/results/engine-cpu.json, table on stdout
    .venv/bin/python -m bench.engine_step --smoke    # 1 repeat, small batch (JSON to the temp dir)

Each mode runs `repeats` single-step trainings from the shipped student on the same prompts and the same
sampling seed (so the same rollouts y_o); times are medians over the repeats, counters come from the last
(they are the same in every repeat: the runs are deterministic). The targets this checks: trd and trd_splice
do no teacher re-scoring forward; trd_splice processes at most half the teacher tokens of trd.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench import harness
from trd_fast.tasks import ChainTask, checkpoint_dir
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import from_dict

RUNS = (("opd", 0), ("trd", 0), ("trd_splice", 0), ("trd_splice", 4), ("trd_splice", 1))  # (mode, scoring chunk)
PHASES = ("rollout_s", "refine_s", "train_s", "step_s")
COUNTERS = ("student_prefill_tokens", "student_decode_tokens", "teacher_prefill_tokens", "teacher_decode_tokens",
            "teacher_tokens", "teacher_forwards", "teacher_rescore_forwards", "trained_tokens", "y_o_len",
            "y_r_len", "failure_rate", "splice_position")


def step_config(mode: str, out: Path, batch_size: int, chunk: int):
    """One step from the shipped student; the same prompts and sampling seed for every mode."""
    return from_dict({
        "model": {"student": str(checkpoint_dir("student")), "teacher": str(checkpoint_dir("teacher"))},
        "data": {"task": "chain", "train_examples": batch_size},
        "distill": {"mode": mode, "splice_chunk": chunk},
        "optim": {"steps": 1, "batch_size": batch_size},
        "run": {"output_dir": str(out), "progress": False, "checkpoint_every": 0, "resume": False,
                "save_student": False}})


def measure(mode: str, chunk: int, repeats: int, batch_size: int) -> dict:
    records = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            records.append(loop.train(step_config(mode, Path(out), batch_size, chunk), ChainTask())[-1])
    name = f"{mode} (chunk {chunk})" if mode == "trd_splice" and chunk else mode
    row = {"mode": name, "splice_chunk": chunk, **{k: statistics.median(r[k] for r in records) for k in PHASES}}
    row.update({k: records[-1].get(k) for k in COUNTERS})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 repeat, batch 4, JSON to the temp dir")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    batch, repeats = (4, 1) if args.smoke else (args.batch_size, args.repeats)
    rows = [measure(mode, chunk, repeats, batch) for mode, chunk in RUNS]
    by_mode = {r["mode"]: r for r in rows}
    trd_tokens = max(1, by_mode["trd"]["teacher_tokens"])
    document = {
        "machine": harness.machine("cpu"),
        "setup": {"task": "chain", "models": "shipped teacher and student (trd_fast/tasks/checkpoints)",
                  "batch_size": batch, "repeats": repeats, "dtype": "float32", "threads": 2},
        "rows": rows,
        "checks": {
            "rescore_forwards": {r["mode"]: r["teacher_rescore_forwards"] for r in rows},
            "teacher_tokens_over_trd": {r["mode"]: r["teacher_tokens"] / trd_tokens for r in rows},
        },
    }
    path = (Path(tempfile.gettempdir()) if args.smoke else Path(__file__).parent / "results") / "engine-cpu.json"
    harness.write_json(path, document)
    header = ["mode", *PHASES, "teacher_prefill_tokens", "teacher_decode_tokens", "teacher_rescore_forwards",
              "failure_rate"]
    print(" | ".join(header + ["teacher tokens / trd"]))
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in header]
        print(" | ".join(cells + [f"{document['checks']['teacher_tokens_over_trd'][r['mode']]:.2f}"]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
