"""The whole CPU matrix in one run -> bench/results/cpu.json, cpu.md and a markdown table on stdout.

    python -m bench.run_cpu                  # full matrix, backend "cpp" (needs trd_fast._C built)
    python -m bench.run_cpu --smoke          # tiny shapes, 2 rounds; backend "cpp" if built, else "torch"
    python -m bench.run_cpu --round-robin    # each case's variants take turns call by call

`make bench` (pytest-benchmark over bench/test_bench_distillation.py) measures the same matrix the same way
and writes the same files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness, suite


def settings(backend: str, smoke: bool, threads: int, runner: str, round_robin: bool = False) -> dict:
    rounds = {kind: (2, 1) for kind in suite.CPU_ROUNDS} if smoke else suite.CPU_ROUNDS
    return {"runner": runner, "backend": backend, "smoke": smoke, "threads": threads, "round_robin": round_robin,
            "rounds_warmup": {kind: {"rounds": r, "warmup": w} for kind, (r, w) in rounds.items()},
            "shapes": suite.CPU_SMOKE_SHAPES if smoke else suite.CPU_SHAPES}


def output_paths(out: str | None, smoke: bool) -> tuple[Path, Path]:
    """JSON and markdown paths: bench/results/cpu.{json,md}; smoke runs go to the temp dir unless --out."""
    if out is None:
        base = Path(tempfile.gettempdir()) / "trd_fast-bench-cpu-smoke.json" if smoke \
            else harness.RESULTS_DIR / "cpu.json"
    else:
        base = Path(out)
    return base, base.with_suffix(".md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: checks the harness end to end")
    parser.add_argument("--backend", choices=("cpp", "torch"), default=None,
                        help="trd_fast backend raced (default: cpp if built, else torch with --smoke)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    parser.add_argument("--round-robin", action="store_true",
                        help="each case's variants take turns call by call (load from other work hits all alike)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/cpu.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backend = args.backend or suite.default_backend("cpu")
    if backend == "cpp" and harness.extension_isa() is None:
        print("bench.run_cpu: trd_fast._C is not built (make install); use --smoke --backend torch", file=sys.stderr)
        return 2
    if backend == "torch" and not args.smoke:
        print("bench.run_cpu: a full run races the C++ backend; build trd_fast._C first", file=sys.stderr)
        return 2
    json_path, md_path = output_paths(args.out, args.smoke)
    matrix = [(c, vs) for c, vs in suite.cpu_matrix(backend, args.smoke) if args.only is None or args.only in c.label]

    started = time.monotonic()
    bandwidth = harness.copy_bandwidth("cpu", nbytes=harness.GIB // 4 if args.smoke else harness.GIB,
                                       rounds=3 if args.smoke else 8)
    print(f"copy bandwidth: {bandwidth['gb_per_s']:.1f} GB/s (best), {bandwidth['median_gb_per_s']:.1f} (median)",
          flush=True)
    document = suite.new_document("cpu", "cpu", bandwidth, settings(backend, args.smoke, args.threads,
                                                                     "python -m bench.run_cpu", args.round_robin))
    suite.run_matrix(matrix, "cpu", document, log=lambda line: print(line, flush=True),
                     on_row=lambda doc: harness.write_json(json_path, doc), round_robin=args.round_robin)
    document["settings"]["wall_s"] = time.monotonic() - started
    suite.note_load(document)
    summary = harness.markdown_summary(document)
    harness.write_json(json_path, document)
    md_path.write_text(summary + "\n", encoding="utf-8")
    print("\n" + summary)
    print(f"\nwrote {json_path} and {md_path} in {document['settings']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
