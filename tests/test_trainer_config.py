"""Run configs: YAML + overrides, type and range errors naming the key, the shipped example config."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from trd_fast.trainer.run.config import NUMERIC_BOUNDS, TrainConfig, check_resumable, load_config

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


# Values that used to pass validation and break the run later: each is rejected at load, naming its key.
RUN_BREAKERS = {
    "data.train_examples=0": "data.train_examples: must be >= 1, got 0",
    "data.train_examples=-3": "data.train_examples: must be >= 1, got -3",
    "data.eval_examples=0": "data.eval_examples: must be >= 1",
    "model.device=tpu": "model.device: 'tpu': not a device",
    "model.device=meta": "model.device: 'meta': no meta device on this machine",
    "optim.lr=.inf": "optim.lr: must be finite, got inf",
    "optim.lr=.nan": "optim.lr: must be finite, got nan",
    "optim.lr=3e38": "optim.lr: must be in (0, 1], got 3e+38",   # AdamW's first step overflowed fp32
    "optim.weight_decay=1e39": "optim.weight_decay: must be within fp32's range",
    "optim.min_lr_ratio=-1": "optim.min_lr_ratio: must be in [0, 1], got -1",
    "optim.min_lr_ratio=1.5": "optim.min_lr_ratio: must be in [0, 1]",
    "distill.temperature=.inf": "distill.temperature: must be finite, got inf",
    "optim.weight_decay=-0.1": "optim.weight_decay: must be >= 0, got -0.1",
    "optim.max_grad_norm=-.inf": "optim.max_grad_norm: must be finite",
    "run.memory_budget_mb=-1": "run.memory_budget_mb: must be >= 0",
    "distill.clip=.inf": "distill.clip: must be finite",
    "distill.prefix_weight=-1": "distill.prefix_weight: must be >= 0",
    "rollout.teacher_temperature=.inf": "rollout.teacher_temperature: must be finite",
    "model.lora_alpha=0": "model.lora_alpha: must be > 0",
    "run.seed=-1": "run.seed: must be in [0, 4294967296), got -1",
    "run.checkpoint_every=-5": "run.checkpoint_every: must be >= 0",
    "data.prompt_template='{prompt'": "data.prompt_template: not a format template",
    "data.refine_template='{prompt} {answer}'": "data.refine_template: unknown placeholder(s) ['answer']",
    "data.answer_pattern=(": "data.answer_pattern: not a regular expression",
    "run.output_dir=''": "run.output_dir: an output directory is required",
}


@pytest.mark.parametrize("override", sorted(RUN_BREAKERS))
def test_values_that_would_break_the_run_name_the_key(override):
    with pytest.raises(ValueError) as error:
        load_config(None, BASE + [override])
    assert str(error.value).startswith(f"config {RUN_BREAKERS[override]}"), str(error.value)


def test_every_numeric_field_is_checked_for_finiteness_and_its_bounds():
    checked = 0
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(section.default_factory):
            default = getattr(section.default_factory(), f.name)
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            key = f"{section.name}.{f.name}"
            bounds = NUMERIC_BOUNDS[key]
            assert bounds.holds(default), key
            outside = [v for v in (bounds.low, bounds.high) if math.isfinite(v)]
            outside = [v - 1 if v == bounds.low else v + 1 for v in outside]
            outside += [v for v, is_open in ((bounds.low, bounds.low_open), (bounds.high, bounds.high_open)) if is_open]
            if isinstance(default, float):
                outside += [math.inf, -math.inf, math.nan]
            for value in outside:
                with pytest.raises(ValueError, match=f"^config {re.escape(key)}: "):
                    load_config(None, BASE + [f"{key}={value}"])
                checked += 1
    assert checked > 60


def test_devices_are_checked_for_availability(monkeypatch):
    assert load_config(None, BASE + ["model.device=cpu"]).model.device == "cpu"
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with pytest.raises(ValueError, match=r"^config model.device: 'cuda': no cuda device on this machine "
                                         r"\(available: cpu\)$"):
        load_config(None, BASE + ["model.device=cuda"])
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert load_config(None, BASE + ["model.device=cuda:0"]).model.device == "cuda:0"
    with pytest.raises(ValueError, match=r"model.device: 'cuda:3': this machine has 1 cuda device"):
        load_config(None, BASE + ["model.device=cuda:3"])
    with pytest.raises(ValueError, match=r"model.device: 'mps': no mps device on this machine \(available: cpu, cuda"):
        load_config(None, BASE + ["model.device=mps"])


def test_config_files_that_are_not_yaml_or_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  student: s\n  teacher: [t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"run.yaml' line 4: not valid YAML"):
        load_config(path)
    path.write_bytes(b"model:\n  student: caf\xe9\n")
    with pytest.raises(ValueError, match=r"run.yaml:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        load_config(path)
    with pytest.raises(ValueError, match=r"--set 'optim.lr=\[1': not valid YAML"):
        load_config(None, BASE + ["optim.lr=[1"])


@pytest.mark.parametrize("override, key", [
    ("data.train_examples=0", "data.train_examples"), ("data.train_examples=-3", "data.train_examples"),
    ("model.device=cuda", "model.device"), ("model.device=tpu", "model.device"), ("optim.lr=.inf", "optim.lr"),
    ("optim.min_lr_ratio=-1", "optim.min_lr_ratio"), ("distill.temperature=.inf", "distill.temperature"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
])
def test_the_cli_exits_2_with_one_line_naming_the_key_before_any_work(tmp_path, capsys, monkeypatch, override,
                                                                      key):
    from trd_fast.cli import main

    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(ROOT / "configs" / "chain-trd.yaml"), "--set", f"run.output_dir={out}",
              "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"trd-fast train: error: config {key}: "), err
    assert not out.exists()


def test_the_memory_budget_defaults_by_device():
    from trd_fast.trainer.run.config import CPU_BUDGET_MB

    assert load_config(None, BASE).budget_bytes == CPU_BUDGET_MB * 2**20
    assert load_config(None, BASE + ["run.memory_budget_mb=2.5"]).budget_bytes == int(2.5 * 2**20)


def test_a_removed_key_says_what_replaced_it():
    with pytest.raises(ValueError, match=r"config distill.dense_target_mb: removed \(teacher targets are"):
        load_config(None, BASE + ["distill.dense_target_mb=512"])


def test_null_unsets_the_shipped_task_for_a_jsonl_file(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1 + 1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"set exactly one of them \(from a config naming a task: --set data.task=null"):
        load_config(ROOT / "configs" / "chain-trd.yaml", [f"data.train_jsonl={data}"])
    config = load_config(ROOT / "configs" / "chain-trd.yaml", ["data.task=null", f"data.train_jsonl={data}"])
    assert config.data.task == "" and config.data.train_jsonl == str(data)


def test_a_resume_is_checked_against_the_recorded_config():
    config = load_config(None, BASE)
    where = Path("runs/x/checkpoint.pt")
    recorded = config.to_dict()                            # tuples here, as the checkpoint keeps them
    check_resumable(config, recorded, where)
    check_resumable(config, yaml.safe_load(yaml.safe_dump(recorded)), where)   # lists, as config.yaml holds them
    check_resumable(config, None, where)                   # no record: nothing to compare
    older = {**recorded, "distill": {k: v for k, v in recorded["distill"].items() if k != "clip"}}
    older.pop("rollout")                                   # keys and sections an older version did not have
    check_resumable(dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, top_k=5),
                                        distill=dataclasses.replace(config.distill, clip=0.3)), older, where)
    with pytest.raises(ValueError, match=r"^the config recorded at runs/x/checkpoint\.pt is damaged \(its optim "):
        check_resumable(config, {**recorded, "optim": [1]}, where)
    resumable = dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=7, micro_batches=2),
                                    run=dataclasses.replace(config.run, eval_every=3, progress=False))
    check_resumable(resumable, recorded, where)
    for changed, key in ((dataclasses.replace(config, run=dataclasses.replace(config.run, seed=1)), "run.seed"),
                         (dataclasses.replace(config, model=dataclasses.replace(config.model, lora_targets=("q_proj",))),
                          "model.lora_targets")):
        with pytest.raises(ValueError, match=rf"^config {re.escape(key)}: .* in the config that trained the checkpoint "
                                             rf"\(runs/x/checkpoint\.pt\); set it back"):
            check_resumable(changed, recorded, where)
