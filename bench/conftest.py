"""pytest-benchmark session for bench/: threads, copy bandwidth, the shared workspace, and cpu.json at the end.

`make bench` runs `pytest bench --benchmark-only`; TRD_BENCH_SMOKE=1 runs the tiny smoke matrix instead (its
JSON goes to the temp dir), TRD_BENCH_BACKEND=cpp|torch picks the backend raced (default: cpp when built).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench import harness, run_cpu, suite

SMOKE = os.environ.get("TRD_BENCH_SMOKE", "0") == "1"
BACKEND = os.environ.get("TRD_BENCH_BACKEND") or suite.default_backend("cpu")
THREADS = 2
_summary = {}


class BenchSession:
    """The document being filled and the workspace holding the current case's inputs."""

    def __init__(self, document: dict):
        self.document = document
        self.workspace = suite.Workspace("cpu")
        self.started = time.monotonic()


def pytest_configure(config):
    torch.set_num_threads(THREADS)
    # raised inside torch while torch.compile imports its machinery; not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def bench_session(request):
    if BACKEND == "cpp" and harness.extension_isa() is None:
        pytest.exit("bench: trd_fast._C is not built (make install), or set TRD_BENCH_BACKEND=torch TRD_BENCH_SMOKE=1",
                    returncode=2)
    bandwidth = harness.copy_bandwidth("cpu", nbytes=harness.GIB // 4 if SMOKE else harness.GIB,
                                       rounds=3 if SMOKE else 8)
    settings = run_cpu.settings(BACKEND, SMOKE, THREADS, "pytest bench --benchmark-only (make bench)")
    session = BenchSession(suite.new_document("cpu", "cpu", bandwidth, settings))
    yield session
    session.workspace.release()
    document = suite.finalize(session.document)
    selected = sum(len(c["rows"]) for c in document["cases"])
    total = sum(len(vs) for _, vs in suite.cpu_matrix(BACKEND, SMOKE))
    if selected < total:
        document["notes"].append(f"partial run: {selected} of the matrix's {total} rows were selected")
    document["settings"]["wall_s"] = time.monotonic() - session.started
    suite.note_load(document)
    json_path, md_path = run_cpu.output_paths(None, SMOKE)
    harness.write_json(json_path, document)
    summary = harness.markdown_summary(document)
    md_path.write_text(summary + "\n", encoding="utf-8")
    _summary.update(text=summary, paths=(json_path, md_path))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _summary:
        terminalreporter.write_sep("=", "trd_fast CPU benchmark summary (markdown)")
        terminalreporter.write_line(_summary["text"])
        terminalreporter.write_line(f"wrote {_summary['paths'][0]} and {_summary['paths'][1]}")
