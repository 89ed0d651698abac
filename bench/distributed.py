"""The engine in one and in two CPU processes on the shipped task: step time, peak memory per rank, and the bytes of
the student's parameters and optimizer state each rank holds (sharded by FSDP2 under torchrun).

    .venv/bin/python -m bench.distributed            # -> bench/results/distributed-cpu.json, table on stdout
    .venv/bin/python -m bench.distributed --smoke    # 2 steps of batch 4 (JSON to the temp dir)

Three runs of the same training (trd, the shipped student and teacher, one thread per process, the same global
batch): a plain process (no launcher), torchrun with 1 process (FSDP2 over one rank) and torchrun with 2 processes
(each rank rolls out, refines and trains half the batch). The runs are repeated in turn (plain, 1, 2, plain, ...)
so that a change in the machine's load falls on all of them. Step times are medians over every repeat's steps
after its first, beside each rank's CPU seconds per step (all its threads: its work, which other jobs on the
machine inflate less than wall time). Peak memory is each process's peak resident set (ru_maxrss: the Python
runtime, torch and transformers included), the largest over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

RUNS = (("plain process", 0), ("torchrun, 1 process", 1), ("torchrun, 2 processes", 2))


def worker_config(out: Path, steps: int, batch_size: int):
    from trd_fast.tasks import checkpoint_dir
    from trd_fast.trainer.run.config import from_dict

    return from_dict({
        "model": {"student": str(checkpoint_dir("student")), "teacher": str(checkpoint_dir("teacher"))},
        "data": {"task": "chain", "train_examples": 4096},
        "rollout": {"max_new_tokens": 40, "temperature": 1.0},
        "distill": {"mode": "trd"},
        "optim": {"steps": steps, "batch_size": batch_size, "lr": 1e-3},
        "run": {"output_dir": str(out / "run"), "progress": False, "checkpoint_every": 0, "resume": False,
                "save_student": False}})


def worker(out: Path, steps: int, batch_size: int) -> None:
    """One rank's training; writes rank{r}.json into `out` (and rank 0 the run's records)."""
    from torch.distributed.tensor import DTensor

    from trd_fast.tasks import ChainTask
    from trd_fast.trainer.run import loop
    from trd_fast.trainer.run.engine import build_engine

    torch.set_num_threads(1)
    optimizers = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    torch.optim.AdamW = RecordedAdamW
    real_step, cpu_seconds = loop._one_step, []

    def timed_step(*args):
        began = time.process_time()
        record = real_step(*args)
        cpu_seconds.append(time.process_time() - began)
        return record

    loop._one_step = timed_step
    config = worker_config(out, steps, batch_size)
    engine = build_engine(config)
    records = loop.train(config, ChainTask(), engine)

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    parameters = sum(local_bytes(p) for p in engine.student_model.parameters())
    optimizer = sum(local_bytes(v) for state in optimizers[0].state.values() for v in state.values()
                    if isinstance(v, torch.Tensor))
    rank = int(os.environ.get("RANK", 0))
    report = {"rank": rank, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "parameter_bytes": parameters, "optimizer_bytes": optimizer, "records": records,
              "cpu_s_per_step": cpu_seconds}
    (out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def launch(processes: int, steps: int, batch_size: int) -> list[dict]:
    """One run of `processes` ranks (0: a plain process); every rank's report."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        arguments = ["-m", "bench.distributed", "--worker", str(out), "--steps", str(steps),
                     "--batch-size", str(batch_size)]
        launcher = ([sys.executable] if not processes else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([*launcher, *arguments], check=True, env=env, cwd=Path(__file__).parents[1])
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("rank*.json"))]


def summarize(name: str, processes: int, repeats: list[list[dict]]) -> dict:
    """The row of one run from its repeats (each: every rank's report)."""
    later = [r for ranks in repeats for r in ranks[0]["records"][1:]]
    records = repeats[0][0]["records"]
    return {"run": name, "processes": max(processes, 1), "repeats": len(repeats),
            **{f"{k}_median": statistics.median(r[k] for r in later)
               for k in ("step_s", "rollout_s", "refine_s", "train_s")},
            "step_s_first": [ranks[0]["records"][0]["step_s"] for ranks in repeats],
            "losses": [r["loss"] for r in records],
            "per_rank": [{"rank": rank, "peak_rss_mib": max(ranks[rank]["peak_rss_mib"] for ranks in repeats),
                          "cpu_s_per_step_median": statistics.median(
                              s for ranks in repeats for s in ranks[rank]["cpu_s_per_step"][1:]),
                          **{k: repeats[0][rank][k] for k in ("parameter_bytes", "optimizer_bytes")}}
                         for rank in range(len(repeats[0]))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 steps of batch 4, JSON to the temp dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch_size)
        return
    steps, batch, repeats = (2, 4, 1) if args.smoke else (args.steps, args.batch_size, args.repeats)
    machine = harness.machine("cpu")  # before the runs: its load average is the one they start under
    reports: dict[str, list] = {name: [] for name, _ in RUNS}
    for _ in range(repeats):
        for name, processes in RUNS:
            reports[name].append(launch(processes, steps, batch))
    rows = [summarize(name, processes, reports[name]) for name, processes in RUNS]
    plain = rows[0]["per_rank"][0]
    document = {
        "machine": machine,
        "setup": {"task": "chain", "mode": "trd", "models": "shipped teacher and student (trd_fast/tasks/checkpoints)",
                  "global_batch": batch, "steps": steps, "repeats": repeats, "dtype": "float32", "threads_per_process": 1,
                  "backend": "gloo", "teacher_placement": "replicate", "max_new_tokens": 40,
                  "student_sampling_temperature": 1.0},
        "loadavg_at_end": harness.loadavg(),
        "rows": rows,
        "sharded_state_saved_per_rank": {
            r["run"]: 1 - max(p["parameter_bytes"] + p["optimizer_bytes"] for p in r["per_rank"])
            / (plain["parameter_bytes"] + plain["optimizer_bytes"]) for r in rows},
    }
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / "distributed-cpu.json"
    harness.write_json(path, document)
    print("run | step s (median) | rollout s | refine s | train s | CPU s per step per rank | "
          "peak RSS MiB per rank | parameter + optimizer KiB per rank")
    for r in rows:
        memory = " / ".join(f"{p['peak_rss_mib']:.0f}" for p in r["per_rank"])
        cpu = " / ".join(f"{p['cpu_s_per_step_median']:.3f}" for p in r["per_rank"])
        state = " / ".join(f"{(p['parameter_bytes'] + p['optimizer_bytes']) / 1024:.0f}" for p in r["per_rank"])
        print(f"{r['run']} | {r['step_s_median']:.3f} | {r['rollout_s_median']:.3f} | {r['refine_s_median']:.3f} | "
              f"{r['train_s_median']:.3f} | {cpu} | {memory} | {state}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
