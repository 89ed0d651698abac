"""`trd-fast pretrain` reproduces its models from the seed, and a run resumed after a crash ends with the
same weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trd_fast.drivers import pretrain


def run(tmp_path, name: str, steps: int = 4):
    pretrain.main(["--models", "student", "--student-steps", str(steps), "--batch-size", "8", "--save-every", "2",
                   "--eval-every", "1000", "--eval-count", "4", "--student-stop-accuracy", "0",
                   "--output-dir", str(tmp_path / name / "out"), "--state-dir", str(tmp_path / name / "state")])
    return load_file(tmp_path / name / "out" / "student" / "model.safetensors")


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pretrain_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    first = run(tmp_path, "first")
    torch.manual_seed(1234)  # the global RNG state before a run must not matter
    assert_same(first, run(tmp_path, "second"))

    real_make_batch = pretrain.make_batch
    calls = []

    def crash_on_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash after the step-2 save")
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "make_batch", crash_on_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed")
    resumed_batches = []

    def counting(*args, **kwargs):
        resumed_batches.append(1)
        return real_make_batch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "make_batch", counting)
    assert_same(first, run(tmp_path, "crashed"))
    assert len(resumed_batches) == 2, "the rerun continues from the step-2 state (steps 3 and 4 only)"
    untrained = run(tmp_path, "zero-steps", steps=0)
    assert any(not torch.equal(first[k], untrained[k]) for k in first), "four steps must change the weights"
