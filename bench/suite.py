"""The benchmark matrix and how one row of it is measured; shared by bench.run_cpu, the pytest-benchmark tests
and bench.run_gpu.

A case is (divergence, N, V, dtype, device); its rows are the variants raced on the same inputs: trd_fast
(kind "ours", optionally in place or forward-only), the eager torch baseline, torch.compile of it, and Liger-
Kernel's pipeline. Every fwd+bwd row times `loss = fn(student, teacher); torch.autograd.grad(loss, student)`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from functools import partial

import torch

import trd_fast
from bench import baselines, harness

DIVERGENCES = (("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5))  # (divergence, beta)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Case:
    divergence: str  # "forward_kl" | "reverse_kl" | "jsd"
    beta: float | None  # jsd mixture weight; None for the KLs
    n: int  # positions (rows of the logits)
    v: int  # vocabulary (columns)
    dtype: torch.dtype  # of both student and teacher logits
    device: str  # "cpu" | "cuda"

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        return harness.case_label(self.describe())

    def describe(self) -> dict:
        return {"divergence": self.divergence, "beta": self.beta, "n": self.n, "v": self.v,
                "dtype": DTYPE_NAMES[self.dtype], "device": self.device, "logit_bytes": self.n * self.v * self.itemsize}


@dataclass(frozen=True)
class Variant:
    name: str  # the row's label
    kind: str  # "ours" | "eager" | "compile" | "liger"
    rounds: int  # timed rounds
    warmup: int  # untimed calls first, >= 1 (the first compiles, for torch.compile)
    backend: str | None = None  # trd_fast backend ("cpp" | "triton" | "torch"), kind "ours" only
    inplace: bool = False  # inplace_backward=True: the gradient overwrites the student logits
    passes: str = "fwd+bwd"  # "fwd+bwd" | "fwd" (forward only, no grad)
    skip: str | None = None  # a reason to skip decided by the matrix (budget, policy)


# Extra bytes per logit element (N*V) beyond the inputs at the peak of one fwd+bwd call, measured on CPU at
# N=256, V=32768 with bench.harness.CpuMemoryProbe (fp32 and bf16, the larger), 25% added; Liger's from its
# code (log-probs of both, the gradient kept from forward, an fp32 per-element loss tile, log_softmax's
# backward). Used only to skip a row that would not fit; on CUDA an OutOfMemoryError is caught as well.
PEAK_BYTES_PER_LOGIT = {
    "eager": {"forward_kl": 25, "reverse_kl": 25, "jsd": 45},
    "compile": {"forward_kl": 6, "reverse_kl": 6, "jsd": 8},
}


def estimated_peak(case: Case, variant: Variant) -> int:
    b = case.itemsize
    if variant.kind == "ours":
        per_logit = 0.25 * b if variant.inplace else 1.25 * b  # the gradient, unless written in place
    elif variant.kind == "liger":
        per_logit = 1.25 * (6 * b + 4)
    else:
        per_logit = PEAK_BYTES_PER_LOGIT[variant.kind][case.divergence]
    return int(per_logit * case.n * case.v)


def headroom(device: str) -> int:
    """Memory left untouched by the skip rule: 3 GiB + 10% of RAM on CPU (the OOM killer is final), 1 GiB on
    CUDA (an OutOfMemoryError is caught and recorded instead)."""
    if device == "cuda":
        return harness.GIB
    total = harness.memory_total() or 0
    return 3 * harness.GIB + total // 10


def memory_skip(case: Case, variant: Variant, inputs_live: bool) -> str | None:
    need = estimated_peak(case, variant)
    free = harness.free_bytes(case.device) - headroom(case.device)
    if not inputs_live:  # student, teacher and the pristine copy are still to be allocated
        free -= 3 * case.n * case.v * case.itemsize
    if need > free:
        return (f"would not fit: needs ~{need / harness.GIB:.1f} GiB beyond the inputs (estimate), "
                f"{max(free, 0) / harness.GIB:.1f} GiB free after headroom")
    return None


# ----------------------------------------------------------------------------------------------------------
# The CPU matrix (the GPU one is in bench/run_gpu.py)

CPU_SHAPES = ((2048, 32768), (1024, 151936))  # (N, V)
CPU_SMOKE_SHAPES = ((64, 4096), (16, 15193))
CPU_DTYPES = (torch.float32, torch.bfloat16)
# (timed rounds, warmup calls) per kind; the eager baselines take seconds per call at these shapes.
CPU_ROUNDS = {"ours": (8, 2), "eager": (3, 1), "compile": (3, 2)}


def default_backend(device: str) -> str:
    """The fused backend raced on `device`: "cpp" on CPU when trd_fast._C is built (else "torch", for smoke
    runs only), "triton" on CUDA."""
    if device == "cuda":
        return "triton"
    return "cpp" if harness.extension_isa() is not None else "torch"


def cpu_matrix(backend: str, smoke: bool = False):
    """[(case, [variants])]: each divergence at each shape and dtype; ours (plus in place, plus forward-only
    for forward_kl) vs eager vs torch.compile."""
    rounds = {kind: (2, 1) for kind in CPU_ROUNDS} if smoke else CPU_ROUNDS
    ours = f"trd_fast[{backend}]"
    matrix = []
    for n, v in CPU_SMOKE_SHAPES if smoke else CPU_SHAPES:
        for dtype in CPU_DTYPES:
            for divergence, beta in DIVERGENCES:
                variants = [Variant(ours, "ours", *rounds["ours"], backend=backend),
                            Variant(f"{ours} inplace", "ours", *rounds["ours"], backend=backend, inplace=True)]
                if divergence == "forward_kl":
                    variants.append(Variant(f"{ours} fwd only", "ours", *rounds["ours"], backend=backend, passes="fwd"))
                variants += [Variant("torch eager", "eager", *rounds["eager"]),
                             Variant("torch.compile", "compile", *rounds["compile"])]
                matrix.append((Case(divergence, beta, n, v, dtype, "cpu"), variants))
    return matrix


# ----------------------------------------------------------------------------------------------------------
# Inputs and the timed step

class Inputs:
    """Student (a leaf requiring grad) and teacher logits, N(0, 2^2), fixed seed; one case's worth."""

    def __init__(self, case: Case, seed: int = 0):
        g = torch.Generator(device=case.device).manual_seed(seed)
        shape = (case.n, case.v)
        self.student = torch.randn(shape, dtype=case.dtype, device=case.device, generator=g).mul_(2)
        self.student.requires_grad_()
        self.teacher = torch.randn(shape, dtype=case.dtype, device=case.device, generator=g).mul_(2)
        self._pristine = None

    @property
    def pristine(self) -> torch.Tensor:
        """A copy of the student logits, restored before each in-place round (kept live, not measured)."""
        if self._pristine is None:
            self._pristine = self.student.detach().clone()
        return self._pristine

    def restore(self) -> None:
        with torch.no_grad():
            self.student.copy_(self.pristine)


def loss_function(case: Case, variant: Variant):
    beta = 0.5 if case.beta is None else case.beta
    if variant.kind == "ours":
        return partial(trd_fast.distillation_loss, divergence=case.divergence, beta=beta,
                       inplace_backward=variant.inplace, backend=variant.backend)
    if variant.kind == "eager":
        return baselines.eager(case.divergence, beta)
    if variant.kind == "compile":
        return baselines.compiled(case.divergence, beta)
    if variant.kind == "liger":
        return baselines.liger(case.divergence, beta)
    raise ValueError(f"variant.kind: unknown {variant.kind!r}")


def make_step(fn, inputs: Inputs, passes: str):
    student, teacher = inputs.student, inputs.teacher
    if passes == "fwd":
        def forward():
            with torch.no_grad():
                return fn(student, teacher)
        return forward

    def forward_backward():
        loss = fn(student, teacher)
        torch.autograd.grad(loss, student)  # the gradient is freed on return (its allocation is timed)
        return loss
    return forward_backward


class Workspace:
    """The current case's inputs (one case alive at a time) and the device's probes; torch.compile state is
    reset between cases so no case hits dynamo's recompile limit or inherits another's guards."""

    def __init__(self, device: str):
        self.device = device
        self.case = None
        self.inputs = None
        self.probe = harness.memory_probe(device)
        self.flush = harness.L2Flush() if device == "cuda" else None

    def inputs_for(self, case: Case) -> Inputs:
        if case != self.case:
            self.release()
            self.inputs = Inputs(case)
            self.case = case
        return self.inputs

    def release(self) -> None:
        self.inputs, self.case = None, None
        torch._dynamo.reset()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        else:
            harness.release_gradient_buffers()

    def inputs_skip(self, case: Case) -> str | None:
        """A reason the case's inputs (student, teacher, a pristine copy) would not fit, else None."""
        if case == self.case:
            return None
        self.release()
        need = 3 * case.n * case.v * case.itemsize
        free = harness.free_bytes(case.device) - headroom(case.device)
        if need > free:
            return f"inputs would not fit: {need / harness.GIB:.1f} GiB needed, {max(free, 0) / harness.GIB:.1f} free"
        return None


def base_row(case: Case, variant: Variant) -> dict:
    return {"variant": variant.name, "kind": variant.kind, "backend": variant.backend, "inplace": variant.inplace,
            "passes": variant.passes,
            "design_bytes": harness.design_bytes(case.divergence, case.n, case.v, case.itemsize, variant.passes),
            "ideal_bytes": harness.ideal_bytes(case.n, case.v, case.itemsize, variant.passes)}


def skipped(case: Case, variant: Variant, reason: str) -> dict:
    return {**base_row(case, variant), "status": "skipped", "reason": reason}


def own_timer(device: str):
    """The timer of the scripts: harness.time_rounds on this device."""
    return partial(harness.time_rounds, device=device)


def prepare(case: Case, variant: Variant, workspace: Workspace):
    """(row, step, rounds): the row so far, after the first call (timed alone: compilation), with the step and
    its per-round hooks; (skipped row, None, None) for a row that would not fit."""
    reason = variant.skip or workspace.inputs_skip(case) or memory_skip(case, variant, case == workspace.case)
    if reason:
        return skipped(case, variant, reason), None, None
    row = base_row(case, variant)
    inputs = workspace.inputs_for(case)
    step = make_step(loss_function(case, variant), inputs, variant.passes)
    setups = [inputs.restore] if variant.inplace else []
    if workspace.flush is not None:
        setups.append(workspace.flush)
    rounds = harness.Rounds(workspace.probe, setup=(lambda: [s() for s in setups]) if setups else None,
                            skip=variant.warmup)
    rounds.before()
    started = time.perf_counter()
    loss = step()
    if case.device == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - started  # includes compilation (torch.compile, Triton JIT)
    rounds.after()
    row["loss"] = float(loss.detach().float())
    return row, step, rounds


def completed(row: dict, variant: Variant, times: list[float], rounds: harness.Rounds) -> dict:
    row.update(harness.summarize(times))
    row.update({"status": "ok", "warmup": variant.warmup, "extra_peak_bytes": rounds.peak})
    return row


def failed(case: Case, variant: Variant, error: Exception) -> dict:
    """The row of a variant that raised: one broken row must not lose the others."""
    message = str(error).splitlines()[0][:300] if str(error) else ""
    return {**base_row(case, variant), "status": "error", "reason": f"{type(error).__name__}: {message}"}


def restore_after_inplace(case: Case, variant: Variant, workspace: Workspace) -> None:
    """The next call of another variant gets the original student logits."""
    if variant.inplace and workspace.case == case:
        workspace.inputs.restore()


def measure(case: Case, variant: Variant, workspace: Workspace, timer) -> dict:
    """One row: first call (timed alone: compilation), then timer(step, rounds, count=, warmup=) -> [s].

    A row that would not fit, or runs out of CUDA memory, comes back with status "skipped" and the reason.
    """
    try:
        row, step, rounds = prepare(case, variant, workspace)
        if step is None:
            return row
        return completed(row, variant, timer(step, rounds, count=variant.rounds, warmup=variant.warmup - 1), rounds)
    except torch.cuda.OutOfMemoryError as error:
        gc.collect()
        torch.cuda.empty_cache()
        return skipped(case, variant, f"CUDA out of memory ({str(error).splitlines()[0][:160]})")
    finally:
        restore_after_inplace(case, variant, workspace)


def measure_round_robin(case: Case, variants: list[Variant], workspace: Workspace, timer) -> list[dict]:
    """The case's rows with their variants taking turns: each variant's first call, then one call of each
    variant in turn (its warmup calls, then its timed rounds) until every one has had its own count, so that
    load from other work on the machine falls on all variants alike. Rows as `measure` gives them."""
    rows, turns = {}, []
    for variant in variants:
        try:
            rows[variant.name], step, rounds = prepare(case, variant, workspace)
            if step is not None:
                turns.append((variant, step, rounds, []))
        except Exception as error:
            rows[variant.name] = failed(case, variant, error)
        finally:
            restore_after_inplace(case, variant, workspace)
    calls = max((variant.warmup - 1 + variant.rounds for variant, *_ in turns), default=0)
    for i in range(calls):
        for variant, step, rounds, times in turns:
            if rows[variant.name].get("status") == "error" or i >= variant.warmup - 1 + variant.rounds:
                continue
            warm = i < variant.warmup - 1
            try:
                times += timer(step, rounds, count=0 if warm else 1, warmup=1 if warm else 0)
            except Exception as error:
                rows[variant.name] = failed(case, variant, error)
            finally:
                restore_after_inplace(case, variant, workspace)
    for variant, _, rounds, times in turns:
        if rows[variant.name].get("status") != "error":
            completed(rows[variant.name], variant, times, rounds)
    return [rows[variant.name] for variant in variants]


# ----------------------------------------------------------------------------------------------------------
# The result document

def new_document(kind: str, device: str, bandwidth: dict, settings: dict) -> dict:
    return {"schema": 1, "kind": kind, "machine": harness.machine(device), "copy_bandwidth": bandwidth,
            "traffic_model": harness.TRAFFIC_MODEL, "memory_method": harness.memory_probe(device).method,
            "baselines": {
                "eager": "bench/baselines.py eager_loss: F.log_softmax of both logits in their own dtype, then "
                         "F.kl_div(log_target=True, reduction='batchmean') (jsd: log M by torch.logaddexp, "
                         "beta KL(q||M) + (1-beta) KL(p||M)), torch.autograd.grad",
                "compile": "torch.compile(eager_loss, dynamic=False), default mode; compiled forward and backward "
                           "(AOTAutograd); first_call_s includes the compilation",
                "liger": "F.log_softmax of both, then liger_kernel.transformers.jsd.LigerJSD(beta): beta 0 = "
                         "forward KL, 1 = reverse KL, 0.5 = our jsd (same M and weights)"},
            "timed_call": "loss = fn(student, teacher); torch.autograd.grad(loss, student) (fwd+bwd rows); "
                          "under torch.no_grad (fwd rows); inputs N(0, 4), fixed seed; in-place rows restore the "
                          "student logits before each round, untimed",
            "settings": settings, "notes": [CPU_GRADIENT_REUSE] if device == "cpu" else [], "cases": []}


CPU_GRADIENT_REUSE = ("trd_fast[cpp] fresh-gradient rows: the C++ backward hands a large gradient the buffer of one "
                      "freed earlier (the previous round's), so from the second call on it allocates nothing and "
                      "its extra peak reads 0; one N V b gradient stays resident between calls "
                      "(trd_fast._C.release_gradient_buffers() frees it; the bench does between cases)")


def add_row(document: dict, case: Case, row: dict) -> None:
    described = case.describe()
    entry = next((c for c in document["cases"] if all(c[k] == described[k] for k in described)), None)
    if entry is None:
        entry = {**described, "rows": []}
        document["cases"].append(entry)
    entry["rows"] = [r for r in entry["rows"] if r["variant"] != row["variant"]] + [row]


def note_load(document: dict) -> None:
    """On CPU, say so in the notes when other work was running (load average above half the cores)."""
    cores = document["machine"].get("cpu_cores") or 1
    start, end = document["machine"].get("loadavg_at_start"), harness.loadavg()
    document["settings"]["loadavg_at_end"] = end
    busy = [x[0] for x in (start, end) if x]
    if document["kind"] == "cpu" and busy and max(busy) > cores / 2:
        document["notes"].append(f"the machine was busy: 1-minute load average {start[0] if start else '?'} at the "
                                 f"start, {end[0] if end else '?'} at the end, on {cores} cores; other work "
                                 f"skews these timings, rerun on a quiet machine")


def finalize(document: dict) -> dict:
    """Derived metrics (GB/s, roofline fractions, speedups, loss agreement with eager) for every row."""
    bandwidth = document["copy_bandwidth"]["gb_per_s"]
    for entry in document["cases"]:
        for row in entry["rows"]:
            harness.derive(row, bandwidth)
        harness.add_speedups(entry["rows"])
        eager = next((r for r in entry["rows"] if r["kind"] == "eager" and r.get("status") == "ok"), None)
        for row in entry["rows"]:
            if eager is not None and row.get("status") == "ok" and row["passes"] == "fwd+bwd":
                row["loss_rel_diff_vs_eager"] = abs(row["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-12)
    return document


def run_matrix(matrix, device: str, document: dict, *, log=print, deadline: float | None = None,
               on_row=None, round_robin: bool = False) -> dict:
    """Measure every (case, variants) of the matrix into the document; rows past `deadline` (time.monotonic)
    are skipped with the reason. on_row(document) runs after each row (e.g. to save progress). round_robin:
    each case's variants take turns call by call (`measure_round_robin`) instead of one after the other."""
    workspace = Workspace(device)
    timer = own_timer(device)

    def record(case, row):
        add_row(document, case, row)
        log(describe_row(case, row))
        if on_row is not None:
            on_row(document)

    for case, variants in matrix:
        if round_robin:
            if deadline is not None and time.monotonic() > deadline:
                rows = [skipped(case, variant, "time budget of the run spent") for variant in variants]
            else:
                rows = measure_round_robin(case, variants, workspace, timer)
            for row in rows:
                record(case, row)
            continue
        for variant in variants:
            if deadline is not None and time.monotonic() > deadline:
                row = skipped(case, variant, "time budget of the run spent")
            else:
                try:
                    row = measure(case, variant, workspace, timer)
                except Exception as error:
                    row = failed(case, variant, error)
            record(case, row)
    workspace.release()
    return finalize(document)


def describe_row(case: Case, row: dict) -> str:
    if row.get("status") != "ok":
        return f"{case.label:45s} {row['variant']:32s} {row['status']}: {row.get('reason')}"
    peak = row.get("extra_peak_bytes")
    return (f"{case.label:45s} {row['variant']:32s} median {row['median_s'] * 1e3:9.2f} ms  min "
            f"{row['min_s'] * 1e3:9.2f} ms  x{row['rounds']}  first {row['first_call_s']:.2f} s  extra peak "
            f"{'-' if peak is None else f'{peak / harness.MIB:.0f} MiB'}  loss {row['loss']:.6g}")
