"""bench/run_gpu.py's fused linear rows run on CPU in smoke mode (tiny shapes), so the GPU check's script is
known to work before a GPU runs it: every row measured or skipped with a reason, and the three losses agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_fused_linear_rows_run_in_smoke_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the cpp backend, not the interpreter
    done = subprocess.run([sys.executable, "-m", "bench.run_gpu", "--device", "cpu", "--smoke", "--no-compile",
                           "--only", "fused_linear jsd", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "trd_fast-bench-gpu-cpu-smoke.json").read_text())
    cases = document["fused_linear"]
    assert [case["divergence"] for case in cases] == ["jsd"]  # one case: the script, not the numbers, is checked
    for case in cases:
        rows = {row["variant"]: row for row in case["rows"]}
        ours, trl = rows["trd_fast[cpp]"], rows["TRL ChunkedDivergenceFunction"]
        assert ours["status"] == trl["status"] == "ok", (ours, trl)
        assert ours["median_s"] > 0 and ours["tflop_per_s"] > 0 and ours["extra_peak_bytes"] is not None
        assert ours["loss"] == pytest.approx(trl["loss"], rel=1e-3)  # bf16 inputs, fp32 math in both
        assert rows["Liger LigerFusedLinearJSD"]["status"] == "skipped"  # Triton kernels: CUDA only
        assert rows["Liger LigerFusedLinearJSD"]["reason"]
    assert "| fused_linear jsd" in (tmp_path / "summary.md").read_text()
