"""Run configs: YAML + overrides, type and range errors naming the key, the shipped example config."""

from __future__ import annotations

from pathlib import Path

import pytest

from trd_fast.trainer.run.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.student=s", "model.teacher=t", "data.task=chain"]


def test_shipped_example_config_is_valid_and_points_at_the_shipped_models():
    config = load_config(ROOT / "configs" / "chain-trd.yaml")
    assert config.distill.mode == "trd" and config.optim.lr == 1e-3 and config.data.task == "chain"
    for path in (config.model.student, config.model.teacher):
        assert (ROOT / path / "config.json").is_file()


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    config = load_config(None, BASE + ["distill.mode=trd_splice", "optim.lr=3e-4", "optim.steps=7",
                                       "run.progress=false", "distill.epistemic_tokens=[Hmm, Wait]"])
    assert config.distill.mode == "trd_splice" and config.optim.lr == 3e-4 and config.optim.steps == 7
    assert config.run.progress is False and config.distill.epistemic_tokens == ("Hmm", "Wait")
    path = tmp_path / "run.yaml"
    path.write_text("distill:\n  mode: opd\noptim:\n  steps: 3\n")
    assert load_config(path, BASE + ["optim.steps=5"]).optim.steps == 5  # --set wins over the file


@pytest.mark.parametrize("override, message", [
    ("optim.steps=1.5", "optim.steps: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("run.resume=1", "run.resume: expected true or false"),
    ("distill.teacher_source=oracle", "distill.teacher_source"),
    ("distill.jsd_beta=2", "distill.jsd_beta"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("distill.splice_window=0", "distill.splice_window"),
    ("trainer.steps=3", "unknown section"),
    ("optimsteps=3", "expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, BASE + [override])


def test_a_run_needs_models_and_exactly_one_data_source():
    with pytest.raises(ValueError, match="model.student"):
        load_config(None, ["model.teacher=t", "data.task=chain"])
    with pytest.raises(ValueError, match="model.teacher"):
        load_config(None, ["model.student=s", "data.task=chain"])
    assert load_config(None, ["model.student=s", "data.task=chain", "distill.teacher_source=self"])
    with pytest.raises(ValueError, match="data.task / data.train_jsonl"):
        load_config(None, BASE + ["data.train_jsonl=x.jsonl"])
