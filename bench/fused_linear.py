"""The fused linear loss (hidden states and LM heads in) against eager torch, torch.compile of it, TRL's chunked
divergence and Liger's fused linear JSD, on CPU: fp32, forward + backward, side by side in one run.

    .venv/bin/python -m bench.fused_linear            # -> bench/results/fused-linear-cpu.json, table on stdout
    .venv/bin/python -m bench.fused_linear --smoke    # tiny shapes, checks the script (JSON to the temp dir)

Per shape (N rows, vocabulary V, student width H, teacher width 2H), forward KL, the mean over rows:
- timed call: `loss = fn(h_s, W_s, h_t, W_t); loss.backward()` with fresh .grad for h_s and W_s each round; the
  variants run round-robin (one round of each, then the next), so that load from other work hits all alike;
  wall-clock seconds and the process's CPU seconds (time.process_time: less skewed by other work taking the
  cores, more by OpenMP threads spinning while they wait);
- GFLOP/s: the problem's matmul work, 2 N V (H_s + H_t) forward + 4 N V H_s backward, over the median time
  (the same numerator for every variant, whatever it computes twice), beside the machine's fp32 matmul rate
  (the best of a 4096^3 torch.mm, measured at the start and the end of the run) and the time of the four
  matmuls alone at full size (h_s W_s^T, h_t W_t^T, dz W_s, dz^T h_s: the floor of any implementation);
- extra peak memory: bench.harness's CPU probe (VmHWM - VmRSS, reset before each round), and the same less
  the returned gradients (h_s and W_s's, which every variant allocates), the contract's measure; trd_fast's
  row adds the tile buffer it keeps resident from the previous call (trd_fast_fresh_tiles frees it before
  each call, so that row pays the tiles' first-touch page faults every time).

    .venv/bin/python -m bench.fused_linear --only trd_fast,trd_fast_fresh_tiles   # a subset of the variants

Then (not with --only), at the largest vocabulary, trd_fast alone with larger tile budgets than its own
(TILE_BUDGET_MIB), round-robin with the default: more rows per block means fewer passes over both heads (each block
reads W_s and W_t through the projections, and the head gradient once more), at the cost of tile memory of rows x V
x 8 bytes (computed, not measured: the kept buffer is the largest budget's, so every budget runs on pre-touched
tiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trd_fast  # noqa: E402
from bench import harness  # noqa: E402
from trd_fast.ops import fused_linear_blocks  # noqa: E402
from trd_fast.ops.fused_linear_ops import dense_rows_per_block  # noqa: E402
from trd_fast.ops.fused_linear_tiles import kept_tile_bytes, release_tile_buffers  # noqa: E402

MIB = 1 << 20
THREADS = 2
TILE_BUDGET_MIB = (512, 1280)  # larger tile budgets than trd_fast's own, at the largest vocabulary (one block at 1280)
FRESH_TILES = "trd_fast_fresh_tiles"  # trd_fast with its kept tile buffer freed before each call
SHAPES = {  # rows N, vocabulary V, student width H (the teacher's is 2H); warmup and timed rounds
    "default": [dict(n=2048, v=32768, h=512, warmup=1, rounds=3), dict(n=1024, v=151936, h=1024, warmup=1, rounds=2)],
    "smoke": [dict(n=64, v=1000, h=32, warmup=1, rounds=2), dict(n=32, v=3001, h=48, warmup=1, rounds=2)],
}


# ------------------------------------------------------------------------------------------------ the variants

def ours(hs, ws, ht, wt):
    return trd_fast.fused_linear_distillation_loss(hs, ws, ht, wt, divergence="forward_kl", backend="cpp")


def eager(hs, ws, ht, wt):
    """The idiomatic baseline: both models' logits, log_softmax, KL, autograd."""
    log_p = torch.log_softmax(hs @ ws.T, dim=-1)
    log_q = torch.log_softmax(ht @ wt.T, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def trl_chunked(hs, ws, ht, wt):
    """TRL's ChunkedDivergenceFunction (beta 0: forward KL(teacher || student)), the mean over rows."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    divergence, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, 0.0, 1.0, 1.0, None, 1.0, None)
    return divergence.mean()


def liger():
    """Liger's fused linear JSD (jsd_beta 0: forward KL) if it imports here, else (None, why)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as error:  # not installed, or broken on CPU: the row says which
        return None, f"liger_kernel does not import here ({type(error).__name__}: {error})"
    return LigerFusedLinearJSD(jsd_beta=0.0), None


def variants():
    out = {"trd_fast": (ours, None), FRESH_TILES: (ours, None), "eager": (eager, None),
           "compile": (torch.compile(eager), None), "trl_chunked": (trl_chunked, None)}
    out["liger"] = liger()
    return out


# ------------------------------------------------------------------------------------------------ measuring

def make_inputs(n, v, h, seed=0):
    """h ~ N(0, 1), W ~ N(0, 4 / H): logits of standard deviation ~2 for both models (teacher width 2H)."""
    generator = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=generator)
    ws = torch.randn(v, h, generator=generator) * (2 / h ** 0.5)
    ht = torch.randn(n, 2 * h, generator=generator)
    wt = torch.randn(v, 2 * h, generator=generator) * (2 / (2 * h) ** 0.5)
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def problem_flops(n, v, h) -> int:
    """Forward projections 2NV(H_s + H_t) and the backward's 2 matmuls 4NVH_s (H_t = 2H_s)."""
    return 2 * n * v * (h + 2 * h) + 4 * n * v * h


def matmul_rate(size: int) -> dict:
    """fp32 torch.mm of size^3: the best of 3 after a warmup, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return {"size": size, "gflop_per_s": 2 * size ** 3 / min(times) / 1e9, "times_s": times}


def matmul_floor(hs, ws, ht, wt) -> float:
    """Seconds of the problem's four matmuls at full size (the logits' and gradients' buffers pre-touched)."""
    with torch.no_grad():
        zs, zt = torch.empty(hs.shape[0], ws.shape[0]), torch.empty(hs.shape[0], ws.shape[0])
        gh, gw = torch.empty_like(hs), torch.empty_like(ws)
        for buffer in (zs, zt, gh, gw):
            buffer.zero_()
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            torch.mm(hs, ws.T, out=zs)
            torch.mm(ht, wt.T, out=zt)
            torch.mm(zs, ws, out=gh)
            torch.mm(zs.T, hs, out=gw)
            best = min(best, time.perf_counter() - start)
    return best


def run_case(shape: dict, table: dict) -> dict:
    n, v, h, warmup, rounds = (shape[key] for key in ("n", "v", "h", "warmup", "rounds"))
    hs, ws, ht, wt = make_inputs(n, v, h)
    gradient_bytes = (hs.numel() + ws.numel()) * 4
    probe = harness.CpuMemoryProbe()
    live = {name: fn for name, (fn, _) in table.items() if fn is not None}
    record = {name: {"times_s": [], "cpu_s": [], "peaks": [], "first_call_s": None, "loss": None} for name in live}
    for i in range(warmup + rounds):
        for name, fn in live.items():
            hs.grad, ws.grad = None, None
            if name == FRESH_TILES:  # the call allocates its tiles and pays their first-touch page faults
                release_tile_buffers()
            kept = kept_tile_bytes() if fn is ours else 0  # resident before the call, used by it
            probe.begin()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = fn(hs, ws, ht, wt)
            loss.backward()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            peak = probe.end()
            peak = None if peak is None else peak + kept
            r = record[name]
            r["loss"] = float(loss.detach())
            if i == 0:
                r["first_call_s"] = elapsed
            if i >= warmup:
                r["times_s"].append(elapsed)
                r["cpu_s"].append(elapsed_cpu)
                r["peaks"].append(peak)
            print(f"  {n}x{v}x{h} {name:12s} round {i}: {elapsed:.2f} s ({elapsed_cpu:.2f} CPU s), extra peak "
                  f"{(peak or 0) / MIB:.0f} MiB, loss {r['loss']:.6f}", flush=True)
    del loss
    hs.grad, ws.grad = None, None
    floor = matmul_floor(hs.detach(), ws.detach(), ht, wt)
    flops = problem_flops(n, v, h)
    rows = []
    for name, (fn, reason) in table.items():
        if fn is None:
            rows.append({"variant": name, "status": "skipped", "reason": reason})
            continue
        r = record[name]
        peak = max(p for p in r["peaks"]) if all(p is not None for p in r["peaks"]) else None
        rows.append({"variant": name, "status": "ok", **harness.summarize(r["times_s"]), "times_s": r["times_s"],
                     "cpu_s": r["cpu_s"], "median_cpu_s": statistics.median(r["cpu_s"]),
                     "first_call_s": r["first_call_s"], "gflop_per_s": flops / statistics.median(r["times_s"]) / 1e9,
                     "extra_peak_bytes": peak,
                     "extra_peak_beyond_gradients_bytes": None if peak is None else max(0, peak - gradient_bytes),
                     "loss": r["loss"]})
    ours_row = next(row for row in rows if row["variant"] == "trd_fast")
    for row in rows:
        if row["status"] == "ok":
            row["trd_fast_speedup"] = row["median_s"] / ours_row["median_s"]
            row["trd_fast_cpu_speedup"] = row["median_cpu_s"] / ours_row["median_cpu_s"]
            row["loss_rel_diff_vs_trd_fast"] = abs(row["loss"] - ours_row["loss"]) / abs(ours_row["loss"])
    return {"n": n, "v": v, "h_student": h, "h_teacher": 2 * h, "dtype": "float32", "divergence": "forward_kl",
            "warmup": warmup,
            "flops": flops, "matmul_floor_s": floor, "matmul_floor_gflop_per_s": flops / floor / 1e9,
            "returned_gradient_bytes": gradient_bytes, "rows": rows}


def tile_budget_sweep(shape: dict, budgets_mib) -> dict:
    """trd_fast at its own tile budget and at each of budgets_mib, round-robin: seconds per call and the rows per
    block each budget gives (the tiles: rows x V x 8 bytes)."""
    n, v, h, warmup, rounds = (shape[key] for key in ("n", "v", "h", "warmup", "rounds"))
    hs, ws, ht, wt = make_inputs(n, v, h)
    own = fused_linear_blocks.TILE_BUDGET_BYTES["cpu"] // MIB
    times = {mib: [] for mib in (own, *budgets_mib)}
    try:
        for i in range(warmup + rounds):
            for mib in times:
                fused_linear_blocks.TILE_BUDGET_BYTES["cpu"] = int(mib * MIB)
                hs.grad, ws.grad = None, None
                start = time.perf_counter()
                ours(hs, ws, ht, wt).backward()  # the mean: its gradients are formed in the forward, at this budget
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[mib].append(elapsed)
                print(f"  {n}x{v}x{h} tile budget {mib} MiB round {i}: {elapsed:.2f} s", flush=True)
    finally:
        fused_linear_blocks.TILE_BUDGET_BYTES["cpu"] = own * MIB
        release_tile_buffers()  # the largest budget's buffer
    flops = problem_flops(n, v, h)
    rows = []
    for mib, measured in times.items():
        block = dense_rows_per_block(hs, ws, ht, wt, int(mib * MIB))
        rows.append({"tile_budget_mib": mib, "rows_per_block": block, "blocks": -(-n // block),
                     "tile_mib": block * v * 8 / MIB, **harness.summarize(measured), "times_s": measured,
                     "gflop_per_s": flops / statistics.median(measured) / 1e9, "default": mib == own})
    return {"n": n, "v": v, "h_student": h, "h_teacher": 2 * h, "rows": rows}


# ------------------------------------------------------------------------------------------------ report

def targets(case: dict, rate: float) -> dict:
    rows = {row["variant"]: row for row in case["rows"] if row["status"] == "ok"}
    ours_row = rows["trd_fast"]
    out = {"speedup_vs_trl_chunked >= 2": rows["trl_chunked"]["trd_fast_speedup"] if "trl_chunked" in rows else None,
           "speedup_vs_eager >= 1": rows["eager"]["trd_fast_speedup"] if "eager" in rows else None,
           "cpu_s_speedup_vs_trl_chunked": rows["trl_chunked"]["trd_fast_cpu_speedup"] if "trl_chunked" in rows else None,
           "cpu_s_speedup_vs_eager": rows["eager"]["trd_fast_cpu_speedup"] if "eager" in rows else None,
           "matmul_rate_fraction >= 0.8": ours_row["gflop_per_s"] / rate}
    eager_peak = rows.get("eager", {}).get("extra_peak_beyond_gradients_bytes")
    ours_peak = ours_row["extra_peak_beyond_gradients_bytes"]
    if eager_peak and ours_peak is not None:
        out["extra_peak_fraction_of_eager <= 1/8"] = ours_peak / eager_peak
    out["extra_peak_mib"] = None if ours_peak is None else ours_peak / MIB
    return out


def table(document: dict) -> str:
    rate = document["matmul_rate_gflop_per_s"]
    head = ["N x V x H_s (H_t)", "variant", "median s", "min s", "median CPU s", "GFLOP/s", "% matmul rate",
            "extra peak MiB", "beyond grads MiB", "trd_fast faster by (wall / CPU s)", "loss rel diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in document["cases"]:
        label = f"{case['n']} x {case['v']} x {case['h_student']} ({case['h_teacher']})"
        for row in case["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {label} | {row['variant']} | skipped: {row['reason']} |" + " |" * (len(head) - 3))
                continue
            cells = [label, row["variant"], f"{row['median_s']:.2f}", f"{row['min_s']:.2f}",
                     f"{row['median_cpu_s']:.2f}", f"{row['gflop_per_s']:.0f}",
                     f"{100 * row['gflop_per_s'] / rate:.0f}", _mib(row["extra_peak_bytes"]),
                     _mib(row["extra_peak_beyond_gradients_bytes"]),
                     f"{row['trd_fast_speedup']:.2f}x / {row['trd_fast_cpu_speedup']:.2f}x",
                     f"{row['loss_rel_diff_vs_trd_fast']:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"| {label} | four matmuls alone | {case['matmul_floor_s']:.2f} | | | "
                     f"{case['matmul_floor_gflop_per_s']:.0f} | "
                     f"{100 * case['matmul_floor_gflop_per_s'] / rate:.0f} | | | | |")
    return "\n".join(lines)


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; JSON to the temp dir")
    parser.add_argument("--only", help="comma-separated variants to run (trd_fast always runs); JSON to the temp dir")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    mode = "smoke" if args.smoke else "default"
    rate_before = matmul_rate(1024 if args.smoke else 4096)
    print(f"fp32 matmul rate: {rate_before['gflop_per_s']:.0f} GFLOP/s; load {harness.loadavg()}", flush=True)
    document = {"machine": harness.machine("cpu"), "threads": THREADS, "method": __doc__, "cases": []}
    table_of_variants = variants()
    if args.only:
        chosen = {"trd_fast", *args.only.split(",")}
        unknown = chosen - set(table_of_variants)
        if unknown:
            parser.error(f"--only: unknown variants {sorted(unknown)} (known: {sorted(table_of_variants)})")
        table_of_variants = {name: entry for name, entry in table_of_variants.items() if name in chosen}
    for shape in SHAPES[mode]:
        document["cases"].append(run_case(shape, table_of_variants))
    if not args.only:
        largest = max(SHAPES[mode], key=lambda shape: shape["v"])
        budgets = (0.25, 0.5) if args.smoke else TILE_BUDGET_MIB  # smoke: budgets of several blocks of its shape
        document["tile_budget_sweep"] = tile_budget_sweep(largest, budgets)
    rate_after = matmul_rate(1024 if args.smoke else 4096)
    document["matmul_rate"] = [rate_before, rate_after]
    document["matmul_rate_gflop_per_s"] = max(rate_before["gflop_per_s"], rate_after["gflop_per_s"])
    document["loadavg_at_end"] = harness.loadavg()
    for case in document["cases"]:
        case["targets"] = targets(case, document["matmul_rate_gflop_per_s"])
    sweep = document.get("tile_budget_sweep", {"rows": []})["rows"]
    for row in sweep:
        row["matmul_rate_fraction"] = row["gflop_per_s"] / document["matmul_rate_gflop_per_s"]
    path = (Path(tempfile.gettempdir()) if args.smoke or args.only else harness.RESULTS_DIR) / "fused-linear-cpu.json"
    harness.write_json(path, document)
    print(table(document))
    for case in document["cases"]:
        print(f"{case['n']}x{case['v']}: targets {case['targets']}")
    for row in sweep:
        print(f"tile budget {row['tile_budget_mib']} MiB: {row['blocks']} blocks of {row['rows_per_block']} rows, "
              f"tiles {row['tile_mib']:.0f} MiB, median {row['median_s']:.2f} s, "
              f"{100 * row['matmul_rate_fraction']:.0f}% of the matmul rate")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
