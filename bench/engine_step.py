"""One training step of each mode on the shipped task's models and the same batch: time per phase and the
token counters (teacher prefill, decode and draft tokens apart, forwards, draft acceptance, re-scoring forwards).

    .venv/bin/python -m bench.engine_step            # -> bench/results/engine-cpu.json, table on stdout
    .venv/bin/python -m bench.engine_step --smoke    # 1 repeat, small batch (JSON to the temp dir)
    python3 -m bench.engine_step --device cuda --repeats 3   # on a GPU -> bench/results/engine-cuda.json

Each run trains `repeats` single steps from the shipped student on the same prompts and the same sampling seed (so
the same rollouts y_o; the greedy teacher writes the same y_r with or without drafts). The repeats go round the
runs in turn, so a change in the machine's load reaches every run alike; times are medians over the repeats (and
their minima, `*_min`, the least disturbed on a shared machine), a run's step over opd's the median of the rounds'
ratios (`step_over_opd_paired`), counters come from the last (they are the same in
every repeat: the runs are deterministic). trd runs with plain decoding and with drafts of several lengths (the
default length is chosen from them), trd_splice with plain decoding and with the default drafts. The targets this
checks: no mode re-scores with the teacher; drafted trd needs at most 1/3 of plain decoding's teacher forwards and
at most 1.25x opd's step time; the drafted splice is no slower than the plain one.

Then two more steps each of opd, plain trd and drafted trd split the refine phase (the less disturbed one is kept):
the seconds inside the teacher model's forwards (synchronised on CUDA, so that launches and kernels both count) and
the rest, the host's work around them (`attribution` in the JSON). The synchronisation perturbs those steps, so they
are kept apart from the timed runs. Last, plain and drafted trd count their teacher forwards (not timed) on
FORWARD_BATCHES batches, the timed one (seed 0) and others (`forwards_over_batches`): a step's forwards are those
of its slowest row, so they swing from batch to batch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from bench import harness
from trd_fast.drivers import positive_int
from trd_fast.tasks import ChainTask, checkpoint_dir
from trd_fast.trainer.rollout.generation import Runner
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import DistillConfig, from_dict

DRAFT = DistillConfig().draft_tokens
MAX_NEW_TOKENS = 40                               # the demo's cap: the refine prompt, an attempt and a rewrite of
                                                  # this many tokens each fit the shipped teacher's 256 positions
FORWARD_BATCHES = 8                               # batches whose teacher forwards are counted (not timed)
TRD_DRAFTS = (0, 2, 3, 4, 8, 16)                  # trd's draft lengths measured (0: plain decoding)
RUNS = (("opd", 0, 0), *(("trd", 0, d) for d in TRD_DRAFTS),
        ("trd_splice", 4, 0), ("trd_splice", 4, DRAFT), ("trd_splice", 0, DRAFT), ("trd_splice", 1, DRAFT))
SPLIT_RUNS = (("opd", 0, 0), ("trd", 0, 0), ("trd", 0, DRAFT))  # runs whose refine phase is split (attribute())
PHASES = ("rollout_s", "refine_s", "train_s", "step_s")
COUNTERS = ("student_prefill_tokens", "student_decode_tokens", "teacher_prefill_tokens", "teacher_decode_tokens",
            "teacher_draft_tokens", "teacher_accepted_tokens", "teacher_acceptance", "teacher_tokens",
            "teacher_forwards", "teacher_rescore_forwards", "trained_tokens", "y_o_len", "y_r_len", "failure_rate",
            "splice_position")


def step_config(mode: str, out: Path, batch_size: int, chunk: int, draft: int, device: str = "cpu", seed: int = 0):
    """One step from the shipped student; the same prompts and sampling seed for every run of one `seed`."""
    return from_dict({
        "model": {"student": str(checkpoint_dir("student")), "teacher": str(checkpoint_dir("teacher")),
                  "device": device},
        "data": {"task": "chain", "train_examples": batch_size},
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS},
        "distill": {"mode": mode, "splice_chunk": chunk, "draft_tokens": draft},
        "optim": {"steps": 1, "batch_size": batch_size},
        "run": {"output_dir": str(out), "seed": seed, "progress": False, "checkpoint_every": 0, "resume": False,
                "save_student": False}})


def run_name(mode: str, chunk: int, draft: int) -> str:
    drafting = f"drafts of {draft}" if draft else "plain decoding"
    if mode == "trd_splice":
        return f"trd_splice ({f'chunk {chunk}' if chunk else 'one pass'}, {drafting})"
    return f"trd ({drafting})" if mode == "trd" else mode


def one_step(mode: str, chunk: int, draft: int, batch_size: int, device: str, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return loop.train(step_config(mode, Path(out), batch_size, chunk, draft, device, seed), ChainTask())[-1]


def forwards_over_batches(batch_size: int, device: str, batches: int = FORWARD_BATCHES) -> dict:
    """Teacher forwards per step of plain and drafted trd on `batches` batches (run seeds 0, 1, ...: other prompts
    and rollouts). A step's forwards are its slowest row's, so they swing from batch to batch."""
    counts = {run_name("trd", 0, draft): [one_step("trd", 0, draft, batch_size, device, seed)["teacher_forwards"]
                                          for seed in range(batches)] for draft in (0, DRAFT)}
    plain, drafted = counts.values()
    return {"seeds": list(range(batches)), **counts, "drafted_over_plain_mean": float(mean_ratio(drafted, plain))}


def mean_ratio(numerators: list[int], denominators: list[int]) -> Fraction:
    """The mean of the ratios of counts, exact (a float mean of 10/33 and 12/33 exceeds 1/3)."""
    return sum(Fraction(n, d) for n, d in zip(numerators, denominators)) / len(numerators)


def measure(repeats: int, batch_size: int, device: str) -> list[dict]:
    """Per run of RUNS, medians and minima of its phases over `repeats` rounds of all runs, and the median over
    rounds of its step time over opd's in the same round (`step_over_opd_paired`: a slow spell of the machine
    reaches both sides of a round's ratio)."""
    records: list[list[dict]] = [[] for _ in RUNS]
    for _ in range(repeats):
        for run, done in zip(RUNS, records):
            done.append(one_step(*run, batch_size, device))
    opd = records[RUNS.index(("opd", 0, 0))]
    rows = []
    for (mode, chunk, draft), done in zip(RUNS, records):
        row = {"mode": run_name(mode, chunk, draft), "splice_chunk": chunk, "draft_tokens": draft,
               **{k: statistics.median(r[k] for r in done) for k in PHASES},
               **{f"{k}_min": min(r[k] for r in done) for k in PHASES},
               "step_over_opd_paired": statistics.median(r["step_s"] / o["step_s"] for r, o in zip(done, opd))}
        row.update({k: done[-1].get(k) for k in COUNTERS})
        rows.append(row)
    return rows


@contextlib.contextmanager
def model_clock(device: str):
    """Within the block, each Runner's seconds inside its model's forwards accumulate in the yielded Counter, by
    runner name (the device synchronised before and after each forward)."""
    seconds: collections.Counter = collections.Counter()
    forward = Runner.backbone

    def timed(self, **inputs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(self, **inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[self.name] += time.perf_counter() - start
        return out

    Runner.backbone = timed
    try:
        yield seconds
    finally:
        Runner.backbone = forward


def attribute(batch_size: int, device: str, tries: int = 2) -> list[dict]:
    """Per run of SPLIT_RUNS, a step's refine phase split into the teacher model's forwards and the host's work
    around them (all of the teacher's forwards run in that phase): of `tries` steps, the one with the shortest refine
    phase (the least disturbed on a shared machine)."""
    rows = []
    for mode, chunk, draft in SPLIT_RUNS:
        splits = []
        for _ in range(tries):
            with model_clock(device) as seconds:
                record = one_step(mode, chunk, draft, batch_size, device)
            splits.append((record["refine_s"], seconds["teacher"], record["teacher_forwards"]))
        refine, model, forwards = min(splits)
        rows.append({"mode": run_name(mode, chunk, draft), "refine_s": refine, "teacher_model_s": model,
                     "refine_host_s": refine - model, "teacher_forwards": forwards,
                     "host_s_per_forward": (refine - model) / max(1, forwards)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 repeat, batch 4, 2 counted batches (the other sizes "
                        "are ignored), JSON to the temp dir; its verdicts mean nothing at that size")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both models run")
    parser.add_argument("--forward-batches", type=positive_int, default=FORWARD_BATCHES,
                        help="batches whose teacher forwards plain and drafted trd count (not timed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, repeats = (4, 1) if args.smoke else (args.batch_size, args.repeats)
    facts = harness.machine(args.device)
    rows = measure(repeats, batch, args.device)
    attribution = attribute(batch, args.device)
    spread = forwards_over_batches(batch, args.device, 2 if args.smoke else args.forward_batches)
    facts["loadavg_at_end"] = harness.loadavg()
    by_name = {r["mode"]: r for r in rows}
    plain_trd = by_name[run_name("trd", 0, 0)]
    drafted_trd = by_name[run_name("trd", 0, DRAFT)]
    plain_splice, drafted_splice = by_name[run_name("trd_splice", 4, 0)], by_name[run_name("trd_splice", 4, DRAFT)]
    document = {
        "machine": facts,
        "setup": {"task": "chain", "models": "shipped teacher and student (trd_fast/tasks/checkpoints)",
                  "batch_size": batch, "max_new_tokens": MAX_NEW_TOKENS, "repeats": repeats, "dtype": "float32",
                  "device": args.device,
                  "threads": args.threads, "default_draft_tokens": DRAFT},
        "rows": rows,
        "attribution": attribution,
        "forwards_over_batches": spread,
        "checks": {
            "rescore_forwards": {r["mode"]: r["teacher_rescore_forwards"] for r in rows},
            "teacher_tokens_over_trd": {r["mode"]: r["teacher_tokens"] / max(1, plain_trd["teacher_tokens"])
                                        for r in rows},
            "trd_forwards_over_plain_decoding": {
                r["mode"]: r["teacher_forwards"] / plain_trd["teacher_forwards"] for r in rows
                if r["mode"].startswith("trd (")},
            "trd_step_over_opd_paired": {r["mode"]: r["step_over_opd_paired"] for r in rows
                                         if r["mode"].startswith("trd (")},
            "targets": {
                "drafted trd forwards <= 1/3 of plain decoding":
                    drafted_trd["teacher_forwards"] <= plain_trd["teacher_forwards"] / 3,
                f"drafted trd forwards <= 1/3 of plain decoding, mean over {len(spread['seeds'])} batches":
                    mean_ratio(spread[run_name("trd", 0, DRAFT)], spread[run_name("trd", 0, 0)]) <= Fraction(1, 3),
                "drafted trd step <= 1.25x opd (median of per-round ratios)":
                    drafted_trd["step_over_opd_paired"] <= 1.25,
                "drafted trd_splice step <= plain trd_splice (each over opd, per-round ratios)":
                    drafted_splice["step_over_opd_paired"] <= plain_splice["step_over_opd_paired"],
            },
        },
    }
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / f"engine-{args.device}.json"
    harness.write_json(path, document)
    header = ["mode", *PHASES, "step_over_opd_paired", "teacher_forwards", "teacher_prefill_tokens",
              "teacher_decode_tokens", "teacher_draft_tokens", "teacher_acceptance", "teacher_rescore_forwards"]
    print(" | ".join(header + ["teacher tokens / trd"]))
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else "-" if r[k] is None else str(r[k]) for k in header]
        print(" | ".join(cells + [f"{document['checks']['teacher_tokens_over_trd'][r['mode']]:.2f}"]))
    for r in attribution:
        print(f"{r['mode']}: refine {r['refine_s']:.3f} s = teacher model {r['teacher_model_s']:.3f} s + host "
              f"{r['refine_host_s']:.3f} s ({1e3 * r['host_s_per_forward']:.1f} ms per forward)")
    print("teacher forwards per batch: " + "; ".join(f"{name} {spread[name]}" for name in spread
                                                     if name.startswith("trd (")))
    if args.smoke:
        print("smoke run: batch 4 and 1 repeat, so these verdicts mean nothing")
    for target, met in document["checks"]["targets"].items():
        print(f"{target}: {'met' if met else 'NOT met'}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
