"""The fused linear rows of the GPU check (bench/run_gpu.py): hidden states and LM heads in, forward+backward.

trd_fast's fused_linear_distillation_loss vs TRL's ChunkedDivergenceFunction (the loss of its DistillationTrainer,
TRL >= 1.16; Triton kernels on CUDA, torch tiles elsewhere) vs Liger-Kernel's LigerFusedLinearJSD, on the same
inputs: hidden states h_s, h_t [N, H] and LM heads W_s, W_t [V, H] in the case's dtype; the loss is the mean
over the N positions of the divergence (beta 0: forward KL, 0.5: the generalized JSD; same convention in all
three). Each row times `loss = fn(h_s, W_s, h_t, W_t); torch.autograd.grad(loss, (h_s, W_s))` and reports:
- the median time of the timed rounds (CUDA events on GPU, a 256 MiB L2 flush before each; wall clock on CPU);
- TFLOP/s of the 8 N V H matmul FLOPs every implementation needs (forward: both projections, 2 N V H each;
  backward: the gradients of h_s and W_s, 2 N V H each), recomputation not counted;
- extra peak memory: bytes allocated beyond the live inputs during the call (torch.cuda.max_memory_allocated
  after minus memory_allocated before), and the same less the returned gradients (N H + V H elements).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

import trd_fast
from bench import harness

GPU_SHAPE = (8192, 151936, 4096)  # (N, V, H): Qwen's vocabulary, a 7-8B model's hidden width
SMOKE_SHAPE = (24, 500, 32)
DIVERGENCES = (("jsd", 0.5), ("forward_kl", 0.0))  # (ours, the beta of TRL and Liger meaning the same)
GPU_ROUNDS, SMOKE_ROUNDS = (5, 2), (1, 1)  # (timed rounds, warmup calls): the first call JIT-compiles / autotunes


@dataclass(frozen=True)
class FusedCase:
    divergence: str  # ours: "forward_kl" | "jsd"
    beta: float  # jsd's beta; TRL's and Liger's beta (0 = forward KL)
    n: int  # positions (rows of the hidden states)
    v: int  # vocabulary (rows of the LM heads)
    h: int  # hidden width of both models
    dtype: torch.dtype  # of the hidden states and heads
    device: str  # "cpu" | "cuda"

    @property
    def label(self) -> str:
        return f"fused_linear {self.divergence} beta={self.beta:g} {self.n}x{self.v}x{self.h} {self.dtype}"

    @property
    def flop(self) -> int:
        return 8 * self.n * self.v * self.h


def matrix(device: str, dtype: torch.dtype, smoke: bool) -> list:
    n, v, h = SMOKE_SHAPE if smoke else GPU_SHAPE
    return [FusedCase(divergence, beta, n, v, h, dtype, device) for divergence, beta in DIVERGENCES]


def trl_available() -> str | None:
    """None when TRL's ChunkedDivergenceFunction imports, else why not."""
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except Exception as error:  # not installed, older than 1.16, or broken against this torch
        return f"TRL's ChunkedDivergenceFunction does not import ({type(error).__name__}: {error})"[:300]
    return None


def variants(case: FusedCase, backend: str, liger_reason: str | None) -> list:
    """[(name, loss function or None, skip reason)] raced on one case."""
    def ours(hs, ws, ht, wt):
        return trd_fast.fused_linear_distillation_loss(hs, ws, ht, wt, divergence=case.divergence, beta=case.beta,
                                                       backend=backend)

    def trl(hs, ws, ht, wt):
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        return ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, case.beta)[0].mean()

    def liger(hs, ws, ht, wt):
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        return LigerFusedLinearJSD(jsd_beta=case.beta)(hs, ws, ht, wt, None)  # no labels: every position

    return [(f"trd_fast[{backend}]", ours, None), ("TRL ChunkedDivergenceFunction", trl, trl_available()),
            ("Liger LigerFusedLinearJSD", liger, liger_reason)]


def inputs(case: FusedCase, seed: int = 0) -> tuple:
    """h_s (grad), W_s (grad), h_t, W_t: hidden states N(0, 1), heads N(0, 4 / H) (logits of std ~2)."""
    g = torch.Generator(device=case.device).manual_seed(seed)

    def randn(rows, scale):
        return (torch.randn(rows, case.h, generator=g, device=case.device) * scale).to(case.dtype)
    head_scale = 2.0 / case.h ** 0.5
    return (randn(case.n, 1.0).requires_grad_(), randn(case.v, head_scale).requires_grad_(), randn(case.n, 1.0),
            randn(case.v, head_scale))


def measure(case: FusedCase, fn, rounds_warmup: tuple, flush) -> dict:
    """One row: the first call alone (compilation, autotuning), then the timed rounds."""
    hs, ws, ht, wt = tensors = inputs(case)
    count, warmup = rounds_warmup
    probe = harness.memory_probe(case.device)
    rounds = harness.Rounds(probe, setup=flush, skip=warmup)

    def step():
        loss = fn(*tensors)
        torch.autograd.grad(loss, (hs, ws))  # the gradients are freed on return (their allocation is timed)
        return loss

    try:
        rounds.before()
        started = time.perf_counter()
        loss = step()
        if case.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - started
        rounds.after()
        times = harness.time_rounds(step, rounds, count=count, warmup=warmup - 1, device=case.device)
    except torch.cuda.OutOfMemoryError as error:
        return {"status": "skipped", "reason": f"CUDA out of memory ({str(error).splitlines()[0][:160]})"}
    finally:
        del tensors, hs, ws, ht, wt
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
    row = {"status": "ok", "first_call_s": first, "loss": float(loss.detach().float()), **harness.summarize(times)}
    row["tflop_per_s"] = case.flop / row["median_s"] / 1e12
    row["extra_peak_bytes"] = rounds.peak
    gradients = (case.n + case.v) * case.h * torch.empty(0, dtype=case.dtype).element_size()
    row["extra_peak_beyond_gradients_bytes"] = None if rounds.peak is None else rounds.peak - gradients
    return row


def run(cases: list, backend: str, *, smoke: bool, liger_reason: str | None, log=print,
        deadline: float | None = None) -> list:
    """Measure every case's variants -> [{case fields, "rows": [...]}]; rows past `deadline` are skipped, and
    the Liger rows with `liger_reason` (run_gpu.liger_status: not installed, no CUDA, disabled)."""
    flush = harness.L2Flush() if cases and cases[0].device == "cuda" else None
    results = []
    for case in cases:
        rows = []
        for name, fn, reason in variants(case, backend, liger_reason):
            if reason is None and deadline is not None and time.monotonic() > deadline:
                reason = "time budget of the run spent"
            if reason is not None:
                row = {"status": "skipped", "reason": reason}
            else:
                try:
                    row = measure(case, fn, SMOKE_ROUNDS if smoke else GPU_ROUNDS, flush)
                except Exception as error:  # one broken row must not lose the others
                    row = {"status": "error", "reason": f"{type(error).__name__}: {str(error)[:300]}"}
            rows.append({"variant": name, **row})
            log(describe(case, rows[-1]))
        add_speedups(rows)
        results.append({"label": case.label, "divergence": case.divergence, "beta": case.beta, "n": case.n,
                        "v": case.v, "h": case.h, "dtype": str(case.dtype).replace("torch.", ""),
                        "flop": case.flop, "rows": rows})
    return results


def add_speedups(rows: list) -> None:
    """speedup_vs_trl / speedup_vs_liger = that baseline's median time / this row's."""
    for key, prefix in (("speedup_vs_trl", "TRL"), ("speedup_vs_liger", "Liger")):
        base = next((r for r in rows if r["variant"].startswith(prefix) and r["status"] == "ok"), None)
        for row in rows:
            if row["status"] == "ok":
                row[key] = base["median_s"] / row["median_s"] if base else None


def describe(case: FusedCase, row: dict) -> str:
    if row["status"] != "ok":
        return f"{case.label:55s} {row['variant']:30s} {row['status']}: {row.get('reason')}"
    peak = row["extra_peak_bytes"]
    return (f"{case.label:55s} {row['variant']:30s} median {row['median_s'] * 1e3:9.2f} ms  "
            f"{row['tflop_per_s']:7.3g} TFLOP/s  extra peak {'-' if peak is None else f'{peak / harness.MIB:.0f} MiB'}"
            f"  loss {row['loss']:.6g}")


def markdown_table(results: list) -> str:
    head = ["case", "variant", "median ms", "TFLOP/s", "extra peak MiB", "beyond gradients MiB", "vs TRL",
            "vs Liger", "loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in results:
        for row in entry["rows"]:
            if row["status"] != "ok":
                cells = [entry["label"], row["variant"], f"{row['status']}: {row.get('reason', '')}"]
                cells += [""] * (len(head) - 3)
            else:
                cells = [entry["label"], row["variant"], harness.fmt(row["median_s"], ".1f", 1e3),
                         harness.fmt(row["tflop_per_s"], ".3g"),
                         harness.fmt(row["extra_peak_bytes"], ".0f", 1 / harness.MIB),
                         harness.fmt(row["extra_peak_beyond_gradients_bytes"], ".0f", 1 / harness.MIB),
                         harness.fmt(row.get("speedup_vs_trl"), ".2f", suffix="x"),
                         harness.fmt(row.get("speedup_vs_liger"), ".2f", suffix="x"), f"{row['loss']:.6g}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
