"""The CPU benchmark's round-robin mode: each case's variants take turns call by call, and an in-place variant
leaves the student logits as it found them for the next variant."""

import torch
from conftest import require_backend

from bench import suite
from trd_fast import reference


def test_variants_take_turns_on_the_same_inputs(monkeypatch):
    require_backend("cpp")
    calls = []
    real = suite.loss_function

    def recording(case, variant):
        fn = real(case, variant)

        def call(*args, **kwargs):
            calls.append(variant.name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(suite, "loss_function", recording)
    case = suite.Case("forward_kl", None, 8, 64, torch.float32, "cpu")
    variants = [suite.Variant("fresh", "ours", 3, 2, backend="cpp"),
                suite.Variant("inplace", "ours", 3, 2, backend="cpp", inplace=True),
                suite.Variant("eager", "eager", 2, 1)]
    workspace = suite.Workspace("cpu")
    pristine = workspace.inputs_for(case).student.detach().clone()
    rows = suite.measure_round_robin(case, variants, workspace, suite.own_timer("cpu"))
    student, teacher = workspace.inputs.student.detach().clone(), workspace.inputs.teacher
    workspace.release()

    # the first calls, then one warmup call of each variant that has one, then the timed rounds in turn
    assert calls == ["fresh", "inplace", "eager", "fresh", "inplace", "eager", "fresh", "inplace", "eager",
                     "fresh", "inplace", "fresh", "inplace"]
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert [row["rounds"] for row in rows] == [3, 3, 2]
    assert torch.equal(student, pristine)
    exact = float(reference.distillation_loss(pristine.double(), teacher.double(), divergence="forward_kl"))
    for row in rows:
        assert abs(row["loss"] - exact) <= 1e-5 * abs(exact), row
