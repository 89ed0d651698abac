"""Every Triton kernel compiles for a real GPU (sm_90: PTX, then a cubin from ptxas) without spilling registers.

The interpreter the other Triton tests run on never invokes Triton's compiler; tests/gpu_compile.py does, in a
subprocess without TRITON_INTERPRET (under it @triton.jit gives interpreted functions). It compiles each
kernel's compile cases (tests/gpu_compile_cases.py: every dtype and constexpr variant) with the autotune
candidate of most values per thread, the heaviest variants with every candidate, and the deliberately broken
kernels of tests/gpu_compile_selftest.py, which must be caught.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

HERE = Path(__file__).parent
SELFTEST = "gpu_compile_selftest."


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(HERE / "gpu_compile.py"), str(out), "--selftest"], cwd=HERE,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def project(results):
    return [r for r in results if not r["kernel"].startswith(SELFTEST)]


def describe(records) -> str:
    return "\n".join(f"{r['kernel']} [{r['case']}] {r['config']}: {r.get('error', r.get('spill_bytes'))}"
                     for r in records)


def test_every_kernel_has_a_compile_case(report):
    assert report["uncovered"] == [], f"kernels without a compile case in gpu_compile_cases.py: {report['uncovered']}"
    assert report["stale"] == [], f"compile cases of kernels that do not exist: {report['stale']}"
    assert {"divergence._divergence_forward_kernel", "token_logprobs._token_logprobs_kernel",
            "prefix_scan._prefix_scan_kernel", "token_logprobs._check_token_ids_kernel"} <= set(report["kernels"])
    assert not any(name.startswith("common.") for name in report["kernels"])  # helpers, not kernels


def test_every_kernel_and_autotune_candidate_compiles(report):
    results = project(report["results"])
    failed = [r for r in results if "error" in r]
    assert not failed, "compile errors for sm_90:\n" + describe(failed)
    from_kernels = {r["kernel"] for r in results}
    assert from_kernels == {k for k in report["kernels"] if not k.startswith(SELFTEST)}
    for kernel in from_kernels:  # each autotune candidate at least once
        compiled = {r["config"] for r in results if r["kernel"] == kernel}
        assert set(report["candidates"][kernel]) <= compiled, kernel
    assert len(report["candidates"]["divergence._divergence_forward_kernel"]) > 1


def test_no_register_spills(report):
    spilled = [r for r in project(report["results"]) if r.get("spill_bytes", 0) > 0]
    assert not spilled, "register spills (bytes spilled):\n" + describe(spilled)
    assert all(0 < r["registers"] <= 255 for r in project(report["results"]))


def test_the_checker_catches_broken_kernels(report):
    """A type error the interpreter accepts, and a tile too large for the registers, are both reported."""
    assert {SELFTEST + "branch_type_kernel", SELFTEST + "spilling_kernel"} <= set(report["kernels"])
    assert SELFTEST + "scale" not in report["kernels"]  # a helper called by kernels
    by_case = {(r["kernel"], r["case"]): r for r in report["results"] if r["kernel"].startswith(SELFTEST)}
    assert "Mismatched type" in by_case[SELFTEST + "branch_type_kernel", "int vs float"]["error"]
    assert by_case[SELFTEST + "spilling_kernel", "4096 fp64, 1 warp"]["spill_bytes"] > 0
    assert by_case[SELFTEST + "spilling_kernel", "256 fp64, 1 warp"]["spill_bytes"] == 0
