"""`trd-fast demo`: train the shipped student with opd (reverse KL), trd and trd_splice from the same start,
over several seeds, evaluate each on held-out problems, and write runs/demo/report.json and curves.png.

Resumable: each (method, seed) run keeps its own checkpoints under OUTPUT/METHOD/seed-N and a finished run's
final evaluation (final.json) is reused, so a rerun after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trd_fast.drivers import positive_int
from trd_fast.tasks.chain import ChainTask
from trd_fast.tasks.paths import checkpoint_dir
from trd_fast.text_files import read_utf8
from trd_fast.trainer.refine.stats import REFINEMENT
from trd_fast.trainer.run.config import ResumeConflict, TrainConfig, from_dict
from trd_fast.trainer.run.evaluate import EVAL_SEED, evaluate_saved
from trd_fast.trainer.run.loop import train
from trd_fast.trainer.run.metrics import METRICS, read_metrics

METHODS = ("opd", "trd", "trd_splice")
MAX_JOBS = 4  # --jobs' default: the cores, at most this many


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output", default="runs/demo", help="where runs, report.json and curves.png go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--eval-problems", type=int, default=500, help="held-out problems of the final evaluation")
    parser.add_argument("--curve-every", type=int, default=20, help="steps between evaluations for the curves")
    parser.add_argument("--curve-problems", type=int, default=200, help="held-out problems per curve point")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--student", default=None, help="student model dir (default: the shipped student)")
    parser.add_argument("--teacher", default=None, help="teacher model dir (default: the shipped teacher)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=positive_int, default=min(MAX_JOBS, _cores()),
                        help="runs trained at once, each in its own process with cores / jobs threads (the tiny "
                             "models gain little from a second thread, so runs side by side finish sooner)")
    return parser


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_config(args: argparse.Namespace, method: str, seed: int) -> TrainConfig:
    return from_dict({
        "model": {"student": args.student or str(checkpoint_dir("student")),
                  "teacher": args.teacher or str(checkpoint_dir("teacher"))},
        "data": {"task": "chain", "train_examples": 100_000, "eval_examples": args.curve_problems},
        "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        "distill": {"mode": method, "opd_loss": "reverse_kl"},
        "optim": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10)},
        "run": {"output_dir": str(Path(args.output) / method / f"seed-{seed}"), "seed": seed,
                "eval_every": args.curve_every, "checkpoint_every": args.curve_every,
                "progress": not args.no_progress, "save_student": True}})


def run(args: argparse.Namespace) -> dict:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight loading and saving bars, once per run
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    task = ChainTask()
    held_out = task.examples("eval", args.eval_problems, EVAL_SEED)
    base = _final_eval(out / "base.json", args.student or str(checkpoint_dir("student")), task, held_out, args)
    runs = [(method, seed) for seed in args.seeds for method in args.methods]
    todo = [r for r in runs if not (Path(run_config(args, *r).run.output_dir) / "final.json").is_file()]
    jobs = min(args.jobs, len(todo))
    if jobs > 1:  # each run in its own process; the first failure stops the queue and is raised here
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=torch.set_num_threads,
                                 initargs=(max(1, _cores() // jobs),)) as pool:
            futures = [pool.submit(_train_and_evaluate, args, method, seed, held_out, jobs) for method, seed in todo]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=f"runs, {jobs} at once",
                                   disable=args.no_progress):
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        for method, seed in todo:
            _train_and_evaluate(args, method, seed, held_out, jobs=1)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for method, seed in runs:
        run_dir = Path(run_config(args, method, seed).run.output_dir)
        final = json.loads(read_utf8(run_dir / "final.json"))
        final["metrics"] = read_metrics(run_dir / METRICS)
        results[method].append(final)
        print(f"{method:>10} seed {seed}: accuracy {final['accuracy']:.3f}")
    report = _report(args, base, results)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _plot(results, base["accuracy"], out / "curves.png")
    print(_table(report))
    print(f"report: {out / 'report.json'}  curves: {out / 'curves.png'}")
    return report


def _train_and_evaluate(args: argparse.Namespace, method: str, seed: int, held_out, jobs: int) -> None:
    """Train one (method, seed) run and evaluate its student on the held-out problems into its final.json, with
    the run's wall seconds, its threads and the runs trained beside it (`jobs`); with several jobs their bars
    would interleave, so the runs show none (the caller shows one over runs)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight loading and saving bars
    quiet = argparse.Namespace(**{**vars(args), "no_progress": args.no_progress or jobs > 1})
    config = run_config(quiet, method, seed)
    run_dir = Path(config.run.output_dir)
    began = time.perf_counter()
    try:
        train(config, ChainTask())
    except ResumeConflict as error:  # run.resume is not the demo's to set: say what is
        raise ValueError(f"{error.difference}; an unfinished demo run resumes only with the arguments that started "
                         f"it: rerun with those, remove {run_dir}, or use another --output") from None
    _final_eval(run_dir / "final.json", str(run_dir / "student"), ChainTask(), held_out, quiet,
                extra={"wall_s": time.perf_counter() - began, "threads": torch.get_num_threads(), "jobs": jobs})


def _final_eval(path: Path, model_dir: str, task, examples, args, extra: dict | None = None) -> dict:
    if path.is_file():
        return json.loads(read_utf8(path))
    result = evaluate_saved(model_dir, task, examples, max_new_tokens=args.max_new_tokens, batch_size=250,
                            progress=not args.no_progress).summary()
    result.update(extra or {})
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return result


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else float("nan")


def _report(args, base: dict, results: dict[str, list[dict]]) -> dict:
    methods = {"base": {"accuracy": [base["accuracy"]] * len(args.seeds)}}
    cost = {}
    for method, runs in results.items():
        methods[method] = {"accuracy": [r["accuracy"] for r in runs],
                           "mean_accuracy": _mean(r["accuracy"] for r in runs),
                           "mean_len": _mean(r["mean_len"] for r in runs)}
        cost[method] = {"wall_s": _mean(r["wall_s"] for r in runs),
                        "train_step_s": _mean(sum(m["step_s"] for m in r["metrics"]) for r in runs),
                        "teacher_tokens": round(_mean(sum(m["teacher_tokens"] for m in r["metrics"]) for r in runs)),
                        "teacher_prefill_tokens": round(_mean(sum(m["teacher_prefill_tokens"] for m in r["metrics"])
                                                              for r in runs)),
                        "teacher_decode_tokens": round(_mean(sum(m["teacher_decode_tokens"] for m in r["metrics"])
                                                             for r in runs)),
                        "teacher_rescore_forwards": sum(m["teacher_rescore_forwards"] for r in runs
                                                        for m in r["metrics"])}
    steps = {m: [rec for r in runs for rec in r["metrics"]] for m, runs in results.items()}
    refinement = {k: _mean(rec.get(k) for rec in steps.get("trd", [])) for k in REFINEMENT}
    refinement["prefix_failure_rate"] = _mean(rec.get("failure_rate") for rec in steps.get("trd_splice", []))
    refinement["splice"] = {k: _mean(rec.get(k) for rec in steps.get("trd_splice", [])) for k in REFINEMENT}
    refinement["splice"]["mean_splice_position"] = _mean(rec.get("splice_position")
                                                         for rec in steps.get("trd_splice", []))
    return {"seeds": list(args.seeds), "eval_problems": args.eval_problems, "methods": methods,
            "refinement": refinement, "cost": cost,
            "setup": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                      "opd_loss": "reverse_kl", "trd_loss": "forward_kl (full vocabulary)",
                      "student_sampling_temperature": 1.0, "teacher_temperature": 0.0,
                      "runs_trained_with": [{"threads": t, "jobs": j} for t, j in sorted(
                          {(r.get("threads"), r.get("jobs")) for runs in results.values() for r in runs}, key=str)]}}


def _table(report: dict) -> str:
    lines = [f"{'method':>10} | accuracy per seed {report['seeds']} | mean  | wall s | teacher tokens",
             "-" * 78]
    for method, entry in report["methods"].items():
        accs = " ".join(f"{a:.3f}" for a in entry["accuracy"])
        cost = report["cost"].get(method, {})
        wall = f"{cost['wall_s']:6.1f}" if cost else "     -"
        tokens = f"{cost['teacher_tokens']}" if cost else "-"
        lines.append(f"{method:>10} | {accs:<28} | {_mean(entry['accuracy']):.3f} | {wall} | {tokens}")
    r = report["refinement"]
    lines.append(f"refinement (trd): y_o accuracy {r['y_o_accuracy']:.3f} -> y_r {r['y_r_accuracy']:.3f}, "
                 f"length {r['y_o_len']:.1f} -> {r['y_r_len']:.1f}, fail->pass {r['fail_to_pass']:.3f}, "
                 f"pass->fail {r['pass_to_fail']:.3f}; splice failure rate {r['prefix_failure_rate']:.3f}")
    return "\n".join(lines)


def _plot(results: dict[str, list[dict]], base_accuracy: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in results.items():
        for ax, key, start in ((accuracy_ax, "eval_accuracy", base_accuracy), (loss_ax, "loss", None)):
            curves = []
            for r in runs:
                points = {m["step"]: m[key] for m in r["metrics"] if m.get(key) is not None}
                if start is not None:
                    points[0] = start
                curves.append(points)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = torch.tensor([[c[s] for s in steps] for c in curves])    # [seeds, points]
            line, = ax.plot(steps, values.mean(0), label=method)
            ax.fill_between(steps, values.min(0).values, values.max(0).values, alpha=0.2, color=line.get_color())
    accuracy_ax.set(title="held-out accuracy (greedy)", xlabel="step", ylabel="accuracy")
    loss_ax.set(title="training loss (opd: reverse KL on y_o; trd: forward KL on y_r)", xlabel="step")
    for ax in (accuracy_ax, loss_ax):
        ax.legend()
    figure.suptitle("seeds shaded (min-max)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
