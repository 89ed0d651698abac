"""Measuring for the benchmarks: the traffic model, timing, copy bandwidth, peak memory, machine facts, the
JSON document and its markdown summary. Shared by the CPU run (pytest-benchmark or bench.run_cpu) and the
GPU run (bench.run_gpu); nothing here knows which losses are raced.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 1 << 30
MIB = 1 << 20
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------------------------------------
# Traffic model (docs/design.md, "Performance contract"); b = bytes per logit, both inputs in the same dtype.

TRAFFIC_MODEL = {
    "forward_kl": "forward 2NVb (read student and teacher once) + backward 3NVb (read both, write the gradient)",
    "reverse_kl": "forward 2NVb + backward 3NVb, as forward_kl",
    "jsd": "forward 4NVb (log M needs both final normalizers: a second read of both rows) + backward 3NVb",
    "ideal": "3NVb for forward+backward (each logit read once, the gradient written once; needs rows held on "
             "chip between the passes); 2NVb for a forward-only pass",
    "forward_only": "a forward-only row counts the forward term alone",
    "copy_bandwidth": "bytes read + bytes written per second by a large dst.copy_(src), best of several",
}


def design_bytes(divergence: str, n: int, v: int, itemsize: int, passes: str) -> int:
    """The design's own traffic: what a kernel built as docs/design.md says must move."""
    forward = (4 if divergence == "jsd" else 2) * n * v * itemsize
    return forward + (3 * n * v * itemsize if passes == "fwd+bwd" else 0)


def ideal_bytes(n: int, v: int, itemsize: int, passes: str) -> int:
    """Each logit read once (and the gradient written once): the floor for any implementation."""
    return (3 if passes == "fwd+bwd" else 2) * n * v * itemsize


# ----------------------------------------------------------------------------------------------------------
# Peak memory probes: begin() before a round, end() after it -> bytes allocated beyond what was live before.

class CpuMemoryProbe:
    """Process resident-set high-water mark, reset before each round.

    begin(): free what can be freed (gc, malloc_trim), reset the kernel's VmHWM to the current RSS by writing
    "5" to /proc/self/clear_refs, and note VmRSS. end(): VmHWM - that RSS. Tensors of [N, V] size are mmap'd
    by glibc and unmapped on free, so each round's allocations are faulted in afresh and counted; only pages
    the process already holds (small reused heap blocks) go uncounted.
    """

    method = ("CPU: /proc/self/status VmHWM - VmRSS, with VmHWM reset through /proc/self/clear_refs ('5') "
              "after gc.collect() + malloc_trim(0) right before each timed round; max over the timed rounds; "
              "inputs (and the pristine copy kept for in-place rows) are live before the reset, so they are "
              "not counted; the returned gradient is.")

    def __init__(self):
        self.base = 0
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc
            self._trim = None
        self.available = self._probe_works()

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status", encoding="utf-8") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else 0

    def _probe_works(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")
            return self._status_kib("VmHWM") > 0
        except OSError:
            return False

    def begin(self) -> None:
        if not self.available:
            return
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        self.base = self._status_kib("VmRSS") * 1024

    def end(self) -> int | None:
        if not self.available:
            return None
        return max(0, self._status_kib("VmHWM") * 1024 - self.base)


class CudaMemoryProbe:
    """torch.cuda.max_memory_allocated() - memory_allocated() before the round (caching-allocator bytes)."""

    method = ("CUDA: torch.cuda.max_memory_allocated() after the round minus torch.cuda.memory_allocated() "
              "before it (peak stats reset before each timed round); max over the timed rounds; inputs and "
              "the pristine copy kept for in-place rows are allocated before, so not counted; the returned "
              "gradient is.")
    available = True

    def __init__(self):
        self.base = 0

    def begin(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def end(self) -> int:
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self.base)


def memory_probe(device: str):
    return CudaMemoryProbe() if device == "cuda" else CpuMemoryProbe()


def free_bytes(device: str) -> int:
    """Memory a new allocation may take now: MemAvailable on CPU, free device memory on CUDA."""
    if device == "cuda":  # free on the device + what the caching allocator holds but does not use
        return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    with open("/proc/meminfo", encoding="utf-8") as f:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) * 1024


# ----------------------------------------------------------------------------------------------------------
# Timing

@dataclass
class Rounds:
    """Per-round hooks around the timed call: `setup` (untimed, e.g. restoring inputs, flushing L2) then a
    memory probe. Usable as pytest-benchmark's pedantic setup/teardown pair."""

    probe: object  # CpuMemoryProbe | CudaMemoryProbe
    setup: object = None  # callable run before each round, untimed
    skip: int = 0  # rounds before the first counted one (warmup)
    calls: int = 0
    peaks: list = field(default_factory=list)

    def before(self) -> None:
        if self.setup is not None:
            self.setup()
        self.probe.begin()

    def after(self, *_args, **_kwargs) -> None:
        peak = self.probe.end()
        self.calls += 1
        if self.calls > self.skip and peak is not None:
            self.peaks.append(peak)

    @property
    def peak(self) -> int | None:
        return max(self.peaks) if self.peaks else None


def clock(device: str):
    """A function step -> seconds: wall clock on CPU, CUDA events on the current stream on CUDA."""
    if device == "cuda":
        def timed(step) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return timed

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    return timed


def time_rounds(step, rounds: Rounds, *, count: int, warmup: int, device: str) -> list[float]:
    """`warmup` untimed then `count` timed calls of step, each wrapped in rounds.before/after."""
    timed = clock(device)
    times = []
    for i in range(warmup + count):
        rounds.before()
        elapsed = timed(step)
        rounds.after()
        if i >= warmup:
            times.append(elapsed)
    return times


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "rounds": len(times)}


class L2Flush:
    """Zeroing a buffer larger than the GPU's L2 before each round, so no round starts with hot inputs."""

    def __init__(self, nbytes: int = 256 * MIB):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()


# ----------------------------------------------------------------------------------------------------------
# Copy bandwidth

def copy_bandwidth(device: str, nbytes: int = GIB, rounds: int = 8) -> dict:
    """Bytes read + bytes written per second by dst.copy_(src) of `nbytes` (best and median of `rounds`)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched: no first-touch page faults in the timed copies
    timed = clock(device)
    timed(lambda: dst.copy_(src))  # warmup
    times = [timed(lambda: dst.copy_(src)) for _ in range(rounds)]
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    rates = [moved / t / 1e9 for t in times]
    return {"gb_per_s": max(rates), "median_gb_per_s": statistics.median(rates), "bytes_per_copy": moved,
            "tensor_bytes": nbytes, "rounds": rounds, "threads": torch.get_num_threads() if device == "cpu" else None,
            "method": f"{nbytes / GIB:.2f} GiB fp32 dst.copy_(src) on {device}, dst pre-touched; "
                      f"(bytes read + bytes written) / time; best of {rounds} after a warmup copy"
                      + ("; CUDA events" if device == "cuda" else "; wall clock")}


# ----------------------------------------------------------------------------------------------------------
# Machine facts

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def memory_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             encoding="utf-8", timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, encoding="utf-8", timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) if rev else None


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews the timings."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3]]
    except (OSError, ValueError):
        return None


def transparent_hugepage() -> dict | None:
    """The kernel's transparent huge page modes, {"enabled": ..., "defrag": ...} (the bracketed choice of each
    /sys/kernel/mm/transparent_hugepage file), or None where they cannot be read: first-touch page faults of a
    fresh [N, V] buffer cost what these modes make them cost."""
    modes = {}
    for name in ("enabled", "defrag"):
        try:
            text = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text(encoding="utf-8")
        except OSError:
            return None
        chosen = re.search(r"\[(\w[\w+]*)\]", text)
        modes[name] = chosen.group(1) if chosen else text.strip()
    return modes


def release_gradient_buffers() -> None:
    """Frees the large gradient buffers trd_fast._C keeps for reuse (nothing to do without the extension)."""
    try:
        from trd_fast import _C
    except ImportError:
        return
    _C.release_gradient_buffers()


def extension_isa() -> str | None:
    """trd_fast._C.cpu_isa() (the SIMD level the C++ kernels were built for), or None if not built."""
    try:
        from trd_fast import _C
    except ImportError:
        return None
    return _C.cpu_isa()


def machine(device: str) -> dict:
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": memory_total(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "trd_fast_cpu_isa": extension_isa(), "git": _git_revision(), "loadavg_at_start": loadavg(),
        "transparent_hugepage": transparent_hugepage(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update({"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                      "gpu_capability": f"{props.major}.{props.minor}", "gpu_sms": props.multi_processor_count,
                      "cuda": torch.version.cuda})
        for package in ("triton", "liger_kernel"):
            try:
                module = __import__(package)
                facts[package] = getattr(module, "__version__", None) or _dist_version(package)
            except Exception:  # absent, or broken against this torch/triton: the rows say which
                facts[package] = None
    return facts


def _dist_version(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def sanitize(name: str) -> str:
    """A device name as a file-name fragment: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------------------------------------
# Derived metrics, JSON, markdown

def derive(row: dict, bandwidth_gb_per_s: float) -> dict:
    """Add GB/s and the roofline fractions to a measured row (design and ideal bytes already in it)."""
    if row.get("status") != "ok":
        return row
    median = row["median_s"]
    row["gb_per_s"] = row["design_bytes"] / median / 1e9  # effective: the design's bytes over the time
    row["frac_design"] = row["design_bytes"] / (bandwidth_gb_per_s * 1e9) / median
    row["frac_ideal"] = row["ideal_bytes"] / (bandwidth_gb_per_s * 1e9) / median
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<kind> = the baseline's median / this row's median, among rows of the same passes."""
    for reference in ("eager", "compile", "liger"):
        for row in rows:
            if row.get("status") != "ok":
                continue
            base = next((r for r in rows if r.get("kind") == reference and r.get("status") == "ok"
                         and r.get("passes") == row.get("passes")), None)
            row[f"speedup_vs_{reference}"] = base["median_s"] / row["median_s"] if base else None


def write_json(path: Path, document: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def case_label(case: dict) -> str:
    beta = "" if case.get("beta") is None else f" beta={case['beta']:g}"
    return f"{case['divergence']}{beta} {case['n']}x{case['v']} {case['dtype']}"


def markdown_table(document: dict, loss_column: bool = False) -> str:
    """One table: a row per (case, variant), skipped rows with their reason; optionally the loss's relative
    difference from the eager baseline's (a sanity check of the kernels at the benchmark shapes)."""
    has_liger = any(r.get("kind") == "liger" for c in document["cases"] for r in c["rows"])
    head = ["case", "variant", "median ms", "min ms", "rounds", "GB/s", "% design", "% ideal 3NV",
            "extra peak MiB", "vs eager", "vs compile"] + (["vs Liger"] if has_liger else []) \
        + (["loss vs eager"] if loss_column else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in document["cases"]:
        for row in case["rows"]:
            label = case_label(case)
            if row.get("status") != "ok":
                cells = [label, row["variant"], f"skipped: {row.get('reason', '')}"] + [""] * (len(head) - 3)
            else:
                cells = [label, row["variant"], fmt(row["median_s"], ".1f", 1e3), fmt(row["min_s"], ".1f", 1e3),
                         str(row["rounds"]), fmt(row["gb_per_s"], ".1f"), fmt(row["frac_design"], ".0f", 100),
                         fmt(row["frac_ideal"], ".0f", 100), fmt(row.get("extra_peak_bytes"), ".0f", 1 / MIB),
                         fmt(row.get("speedup_vs_eager"), ".2f", suffix="x"),
                         fmt(row.get("speedup_vs_compile"), ".2f", suffix="x")]
                if has_liger:
                    cells.append(fmt(row.get("speedup_vs_liger"), ".2f", suffix="x"))
                if loss_column:
                    cells.append(fmt(row.get("loss_rel_diff_vs_eager"), ".1e"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_summary(document: dict, loss_column: bool = False) -> str:
    m, bw = document["machine"], document["copy_bandwidth"]
    thp = m.get("transparent_hugepage")
    where = m.get("gpu") or (f"{m['cpu']}, {m['torch_threads']} threads, ISA {m.get('trd_fast_cpu_isa')}"
                             + (f", THP {thp['enabled']} / defrag {thp['defrag']}" if thp else ""))
    lines = [f"{where}; torch {m['torch']}; {m['date']}; copy bandwidth {bw['gb_per_s']:.1f} GB/s "
             f"(read + write).",
             "% design: the design's own traffic (fwd+bwd: 5NVb for the KLs, 7NVb for jsd; fwd: 2NVb / 4NVb) "
             "at the copy bandwidth over the time; % ideal: 3NVb (fwd: 2NVb) likewise. GB/s = design bytes / "
             "time for every row. Extra peak: bytes allocated beyond the inputs during the timed call.", "",
             markdown_table(document, loss_column)]
    notes = document.get("notes") or []
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def record_losses(trainer) -> list:
    """The loss of every compute_loss call of `trainer` from now on, appended to the returned list."""
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append(float(loss.detach()))
        return loss
    trainer.compute_loss = recording
    return losses
