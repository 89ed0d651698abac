"""No checkpoint is ever written (or resumed) with NaN or inf in the weights or the optimizer state: the run stops
with an error naming the step and the tensor, and the last good checkpoint stays as it was."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import make_model, make_pair, write_jsonl
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.checkpoint import NonFiniteState
from trd_fast.trainer.run.config import from_dict


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    student, teacher = make_pair(root)
    return {"student": str(student), "teacher": str(teacher), "data": str(write_jsonl(root / "train.jsonl", 16))}


def make_config(models, out, steps=3):
    return from_dict({"model": {"student": models["student"], "teacher": models["teacher"]},
                      "data": {"train_jsonl": models["data"], "eval_examples": 4},
                      "rollout": {"max_new_tokens": 5}, "distill": {"mode": "opd"},
                      "optim": {"steps": steps, "batch_size": 2, "lr": 1e-3},
                      "run": {"output_dir": str(out), "progress": False, "checkpoint_every": 1}})


def poison_after(monkeypatch, bad_step: int, where: str) -> None:
    """After the optimizer step of step `bad_step` (1-based), put a NaN / inf into a weight or AdamW's state."""
    real_step = loop._one_step

    def poisoned(config, task, engine, tokenize, examples, step, generator, optimizer, *rest):
        record = real_step(config, task, engine, tokenize, examples, step, generator, optimizer, *rest)
        if step + 1 == bad_step:
            parameter = next(p for p in engine.student_model.parameters() if p.requires_grad)
            with torch.no_grad():
                if where == "weight":
                    parameter.view(-1)[3] = math.nan
                else:
                    optimizer.state[parameter]["exp_avg_sq"].view(-1)[0] = math.inf
        return record

    monkeypatch.setattr(loop, "_one_step", poisoned)


@pytest.mark.parametrize("where, named", [("weight", "model.model."), ("optimizer", "optimizer.state.0.exp_avg_sq")])
def test_a_non_finite_state_never_overwrites_the_last_good_checkpoint(models, tmp_path, monkeypatch, where, named):
    poison_after(monkeypatch, 2, where)
    with pytest.raises(NonFiniteState) as error:
        loop.train(make_config(models, tmp_path), JsonlTask(make_config(models, tmp_path).data))
    message = str(error.value)
    assert message.startswith(f"step 2: 1 value(s) to save hold NaN or inf (first: {named}"), message
    assert message.endswith(f"{tmp_path / 'checkpoint.pt'} keeps its previous content; the run stops here")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "student").exists()
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))


def test_the_first_checkpoint_is_not_written_either(models, tmp_path, monkeypatch):
    poison_after(monkeypatch, 1, "weight")
    with pytest.raises(NonFiniteState, match="checkpoint.pt was not written; the run stops here"):
        loop.train(make_config(models, tmp_path), JsonlTask(make_config(models, tmp_path).data))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_non_finite_checkpoint_is_not_resumed(models, tmp_path):
    config = make_config(models, tmp_path, steps=1)
    loop.train(config, JsonlTask(config.data))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] = math.inf  # e.g. written by an older version
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = make_config(models, tmp_path, steps=2)
    with pytest.raises(NonFiniteState, match=f"holds NaN or inf in 1 value\\(s\\) \\(first: model.{name}\\); it cannot "
                                             "be resumed"):
        loop.train(resumed, JsonlTask(resumed.data))


def test_the_cli_stops_a_diverged_run_with_one_line(models, tmp_path, monkeypatch, capsys):
    from trd_fast.cli import main

    poison_after(monkeypatch, 2, "weight")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--set", f"model.student={models['student']}", "--set", f"model.teacher={models['teacher']}",
              "--set", f"data.train_jsonl={models['data']}", "--set", f"run.output_dir={tmp_path}",
              "--set", "run.progress=false", "--set", "run.checkpoint_every=1", "--set", "optim.steps=3",
              "--set", "optim.batch_size=2", "--set", "rollout.max_new_tokens=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1].startswith("trd-fast train: error: step 2: "), err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_every_state_and_model_directory_the_project_saves_is_checked(tmp_path):
    from tiny_models import make_tokenizer
    from trd_fast.trainer.run.checkpoint import atomic_save, save_model_directory

    path = tmp_path / "pretrain.pt"
    atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteState, match=r"^1 value\(s\) to save hold NaN or inf \(first: optim.param_groups.0.lr"):
        atomic_save({"model": {"w": torch.ones(3)}, "optim": {"param_groups": [{"lr": math.inf}]}, "step": 2}, path)
    assert path.read_bytes() == before
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    model = make_model(tmp_path / "unused", "llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteState, match=r"\(first: lm_head.weight\); .*student was not written"):
        save_model_directory(model, tokenizer, tmp_path / "student")
    assert not (tmp_path / "student").exists()
