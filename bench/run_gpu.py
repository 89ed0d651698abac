"""The GPU matrix in one run (called by bench/gpu_check.sh) -> bench/results/gpu-<device>.json + summary.md.

    python3 -m bench.run_gpu --budget-s 150 --out-dir "$OUT"     # on a CUDA machine
    python -m bench.run_gpu --device cpu --smoke                 # tiny shapes on CPU: checks the script itself

First the fused linear rows (bench/fused_linear_gpu.py): hidden states and LM heads in, bf16, N=8192, V=151936,
H=4096, fused_linear_distillation_loss vs TRL's ChunkedDivergenceFunction vs Liger's LigerFusedLinearJSD (time,
TFLOP/s, extra memory). Then the logits matrix: forward+backward at N=8192, V in (151936, 32768), bf16 and
fp32, each divergence: trd_fast (backend "triton", and in place) vs eager torch vs torch.compile of it vs
Liger-Kernel's pipeline (log_softmax of both + LigerJSD), plus a forward-only row for forward_kl (target: 85%
of the 2NVb roofline at the copy bandwidth). Cases run in priority order and rows past the time budget are
recorded as skipped, so the JSON and the summary are always written. fp32 baselines at V=151936 are skipped by design (each fp32 [8192, 151936]
intermediate is 5 GB and eager autograd holds several).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import baselines, fused_linear_gpu, harness, suite

N = 8192
VOCABS = (151936, 32768)
SMOKE_N, SMOKE_VOCABS = 4, (1000, 257)  # tiny: the Triton interpreter takes seconds per call
FWD_TARGET = 0.85  # forward-only forward_kl: fraction of the 2NVb roofline at the copy bandwidth
# (timed rounds, warmup calls) per kind; the first call of torch.compile compiles, Liger's JIT-compiles.
GPU_ROUNDS = {"ours": (20, 3), "eager": (5, 1), "compile": (5, 2), "liger": (10, 2)}
SMOKE_ROUNDS = {kind: (1, 1) for kind in GPU_ROUNDS}
FP32_BIG_BASELINES = ("skipped by design: fp32 [8192, 151936] baselines (each [N, V] fp32 intermediate is 5 GB, "
                      "eager autograd holds several) do not fit the run's memory and time budget")


def gpu_matrix(backend: str, device: str, *, smoke: bool, with_compile: bool, with_liger: bool,
               liger_reason: str | None):
    """[(case, [variants])] in priority order: bf16 at both vocabularies, then fp32 (baselines only where
    they fit)."""
    rounds = SMOKE_ROUNDS if smoke else GPU_ROUNDS
    n, vocabs = (SMOKE_N, SMOKE_VOCABS) if smoke else (N, VOCABS)
    big = max(vocabs)
    ours = f"trd_fast[{backend}]"
    matrix = []
    for dtype, vocab_order in ((torch.bfloat16, vocabs), (torch.float32, tuple(sorted(vocabs)))):
        for v in vocab_order:
            for divergence, beta in suite.DIVERGENCES:
                policy = FP32_BIG_BASELINES if dtype == torch.float32 and v == big and not smoke else None
                variants = [suite.Variant(ours, "ours", *rounds["ours"], backend=backend),
                            suite.Variant(f"{ours} inplace", "ours", *rounds["ours"], backend=backend, inplace=True)]
                if divergence == "forward_kl":
                    variants.append(suite.Variant(f"{ours} fwd only", "ours", *rounds["ours"], backend=backend,
                                                  passes="fwd"))
                variants.append(suite.Variant("torch eager", "eager", *rounds["eager"], skip=policy))
                variants.append(suite.Variant("torch.compile", "compile", *rounds["compile"],
                                              skip=policy or (None if with_compile else "torch.compile disabled")))
                variants.append(suite.Variant("Liger (log_softmax + LigerJSD)", "liger", *rounds["liger"],
                                              skip=policy or liger_reason or (None if with_liger else "disabled")))
                matrix.append((suite.Case(divergence, beta, n, v, dtype, device), variants))
    return matrix


def liger_status(device: str) -> str | None:
    """None when Liger's pipeline can run here, else why not."""
    if not baselines.liger_available():
        return "liger-kernel is not installed (carry its wheel in .whl/)"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Liger's Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    return None


def check_forward_target(document: dict) -> None:
    """Mark forward-only rows with the 85% target and whether they meet it."""
    for entry in document["cases"]:
        for row in entry["rows"]:
            if row.get("passes") == "fwd" and row.get("status") == "ok":
                row["target_frac_design"] = FWD_TARGET
                row["meets_target"] = row["frac_design"] >= FWD_TARGET


def summary_markdown(document: dict, test_status: str | None) -> str:
    lines = ["# trd_fast GPU check", ""]
    if test_status:
        lines += [f"tests: {test_status}", ""]
    if document.get("fused_linear"):
        lines += ["Fused linear (hidden states and LM heads in), forward+backward; TFLOP/s of the 8NVH matmul "
                  "FLOPs; extra peak beyond the inputs, and beyond the inputs and the returned gradients:", "",
                  fused_linear_gpu.markdown_table(document["fused_linear"]), ""]
    lines.append(harness.markdown_summary(document, loss_column=True))
    fwd = [(entry, row) for entry in document["cases"] for row in entry["rows"]
           if row.get("passes") == "fwd" and row.get("status") == "ok"]
    if fwd:
        lines += ["", f"Forward-only forward_kl vs the {FWD_TARGET:.0%} target of the 2NVb roofline:"]
        lines += [f"- {harness.case_label(e)}: {r['frac_design']:.0%} ({'meets' if r['meets_target'] else 'misses'})"
                  for e, r in fwd]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds (any device)")
    parser.add_argument("--backend", choices=("triton", "cpp", "torch"), default=None,
                        help="trd_fast backend raced (default: triton on CUDA; on CPU triton under "
                             "TRITON_INTERPRET=1, else cpp if built, else torch)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger rows")
    parser.add_argument("--budget-s", type=float, default=None, help="rows starting after this many seconds "
                                                                      "are recorded as skipped")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    parser.add_argument("--out-dir", default=None, help="also copy the JSON and write summary.md here")
    parser.add_argument("--tests", default=None, help="a line on the test run, for summary.md")
    args = parser.parse_args(argv)

    started = time.monotonic()
    deadline = started + args.budget_s if args.budget_s else None
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.run_gpu: no CUDA device (use --device cpu --smoke to check the script)", file=sys.stderr)
        return 2
    if device == "cpu" and not args.smoke:
        print("bench.run_gpu: --device cpu runs only with --smoke", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(2)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    backend = args.backend or ("triton" if device == "cuda" or interpreted else suite.default_backend("cpu"))
    liger_reason = liger_status(device)
    matrix = [(case, variants) for case, variants in
              gpu_matrix(backend, device, smoke=args.smoke, with_compile=not args.no_compile,
                         with_liger=not args.no_liger, liger_reason=liger_reason)
              if args.only is None or args.only in case.label]
    # torch.compile rows compile for ~10-30 s each: run them after every other row, so a tight budget
    # loses compile rows first (rows are still grouped by case in the JSON and the table).
    matrix = [(c, [v for v in vs if v.kind != "compile"]) for c, vs in matrix] + \
             [(c, [v for v in vs if v.kind == "compile"]) for c, vs in matrix]

    bandwidth = harness.copy_bandwidth(device, nbytes=(harness.GIB // 4 if args.smoke else 2 * harness.GIB),
                                       rounds=3 if args.smoke else 10)
    print(f"copy bandwidth: {bandwidth['gb_per_s']:.0f} GB/s (best), {bandwidth['median_gb_per_s']:.0f} (median)",
          flush=True)
    name = harness.sanitize(torch.cuda.get_device_name(0)) if device == "cuda" else "cpu"
    json_path = (Path(tempfile.gettempdir()) / f"trd_fast-bench-gpu-{name}-smoke.json" if args.smoke
                 else harness.RESULTS_DIR / f"gpu-{name}.json")  # smoke results never land in bench/results
    document = suite.new_document("gpu", device, bandwidth, {
        "runner": "python3 -m bench.run_gpu", "backend": backend, "smoke": args.smoke, "budget_s": args.budget_s,
        "rounds_warmup": {k: {"rounds": r, "warmup": w} for k, (r, w) in (SMOKE_ROUNDS if args.smoke
                                                                          else GPU_ROUNDS).items()},
        "timing": "CUDA events around each call, a 256 MiB L2 flush before each round (untimed)"
                  if device == "cuda" else "wall clock", "tests": args.tests})
    if liger_reason:
        document["notes"].append(f"Liger rows skipped: {liger_reason}")
    document["notes"].append("Liger's LigerJSD(beta) uses our beta convention (0 = forward KL, 1 = reverse KL, "
                             "M = beta teacher + (1 - beta) student); it takes log-probs, so its pipeline adds two "
                             "log_softmax and their backward, keeps dL/dlogp ([N, V]) from forward to backward, "
                             "allocates an fp32 [N, V] loss tile, and returns the loss in the input dtype.")

    def save(doc):
        harness.write_json(json_path, doc)

    fused_cases = [case for case in fused_linear_gpu.matrix(device, torch.bfloat16, args.smoke)
                   if args.only is None or args.only in case.label]
    document["fused_linear"] = fused_linear_gpu.run(fused_cases, backend, smoke=args.smoke,
                                                liger_reason=liger_reason or ("disabled" if args.no_liger else None),
                                                log=lambda line: print(line, flush=True), deadline=deadline)
    save(document)
    suite.run_matrix(matrix, device, document, log=lambda line: print(line, flush=True), deadline=deadline,
                     on_row=save)
    check_forward_target(document)
    document["settings"]["wall_s"] = time.monotonic() - started
    save(document)
    summary = summary_markdown(document, args.tests)
    print("\n" + summary)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(json_path, out / json_path.name)
        (out / "summary.md").write_text(summary, encoding="utf-8")
    print(f"wrote {json_path} in {document['settings']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
