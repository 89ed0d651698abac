"""The TRD engine end to end on tiny random models: every mode and teacher source trains, the teacher targets
captured during refinement give the logits of a fresh teacher forward, splices keep y_o's prefix, nothing is re-scored,
resume reproduces the loss curve, and bad input stops with a clear error."""

from __future__ import annotations

import json
import math
import re
import zipfile

import pytest
import torch

import trd_fast
from tiny_models import implied, make_model, make_pair, make_tokenizer, write_jsonl
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.protocol import Tokenize
from trd_fast.trainer.refine.modes import BUILDERS, build_batch
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.run import config as config_module
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.checkpoint import CHECKPOINT, discard_checkpoint
from trd_fast.trainer.run.config import CONFIG, from_dict
from trd_fast.trainer.run.engine import build_engine
from trd_fast.trainer.run.sharded_checkpoint import CHECKPOINTS, discard_sharded
from trd_fast.trainer.train.step import train_on

MODES = ("opd", "trd", "trd_splice")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    student, teacher = make_pair(root)
    data = write_jsonl(root / "train.jsonl", 32)
    return {"student": str(student), "teacher": str(teacher), "data": str(data)}


def make_config(models, out, **sections):
    raw = {"model": {"student": models["student"], "teacher": models["teacher"]},
           "data": {"train_jsonl": models["data"], "eval_examples": 8},
           "rollout": {"max_new_tokens": 6, "temperature": 1.0},
           "distill": {"splice_threshold": 3.0, "splice_window": 1},
           "optim": {"steps": 2, "batch_size": 4, "lr": 1e-3},
           "run": {"output_dir": str(out), "progress": False, "checkpoint_every": 1}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def batch_of(config, task, engine, examples, *, seed):
    """The configured mode's batch of `examples` (ledger rows 0, 1, ...) with sampling seed `seed`."""
    request = BatchRequest(config, task, Tokenize(engine.tokenizer), engine.student, engine.teacher,
                           torch.Generator().manual_seed(seed), examples, list(range(len(examples))))
    return build_batch(request)[0]


def teacher_forward(model, context, completion):
    ids = torch.cat([context, completion])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(context) - 1:len(context) + len(completion) - 1].float()


def heads_of(engine, budget_bytes=1 << 30):
    """train_on's keyword arguments for the engine's models."""
    return dict(teacher_head=engine.teacher_head, budget_bytes=budget_bytes)


def test_every_configurable_mode_has_a_batch_builder():
    assert set(BUILDERS) == set(config_module.MODES) == set(MODES)


@pytest.mark.parametrize("source", ["external", "self"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_two_steps(models, tmp_path, mode, source):
    config = make_config(models, tmp_path, distill={"mode": mode, "teacher_source": source})
    records = loop.train(config, JsonlTask(config.data))
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] >= 0
        assert r["trained_tokens"] > 0 and r["student_decode_tokens"] > 0
        assert r["teacher_tokens"] == (r["teacher_prefill_tokens"] + r["teacher_decode_tokens"]
                                       + r["teacher_draft_tokens"]) > 0
        assert 0 <= r["teacher_accepted_tokens"] <= r["teacher_draft_tokens"]
        if mode != "trd_splice":  # drafting is on by default; a splice drafts only where it decodes past y_o's cut
            assert (r["teacher_draft_tokens"] > 0) == (mode == "trd")
        if mode != "opd":
            assert r["teacher_rescore_forwards"] == 0 and r["teacher_rescore_tokens"] == 0
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "student" / "config.json").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.parametrize("source", ["external", "self"])
@pytest.mark.parametrize("mode", MODES)
def test_captured_targets_equal_a_fresh_teacher_forward(models, tmp_path, mode, source):
    config = make_config(models, tmp_path, distill={"mode": mode, "teacher_source": source, "splice_chunk": 2})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    tokenize = Tokenize(engine.tokenizer)
    examples = list(task.examples("train", 6, 0))
    engine.teacher.new_step()
    batch = batch_of(config, task, engine, examples, seed=3)
    teacher_model = engine.teacher.model
    privileged = source == "self"
    for b, example in enumerate(examples):
        if mode == "trd":
            context = tokenize(task.refine_prompt(example, tokenize.text(batch.originals[b]), privileged))
        else:
            context = tokenize(task.teacher_prompt(example, privileged))
        expected = teacher_forward(teacher_model, context, batch.completions[b])
        torch.testing.assert_close(implied(teacher_model, batch.targets[b]), expected, atol=1e-4, rtol=1e-4)
        assert batch.weights[b].shape == batch.completions[b].shape
    if mode == "trd_splice":
        for b, k in enumerate(batch.cut.tolist()):
            assert torch.equal(batch.completions[b][:k], batch.originals[b][:k])
            if k == len(batch.originals[b]):
                assert torch.equal(batch.completions[b], batch.originals[b])
    if mode != "opd":
        assert engine.teacher.counters.rescore_forwards == 0
    else:
        assert torch.equal(torch.cat(batch.completions), torch.cat(batch.originals))


def test_splice_failure_points_match_prefix_scan_of_a_fresh_signal(models, tmp_path):
    def spliced(threshold):
        config = make_config(models, tmp_path, distill={"mode": "trd_splice", "splice_threshold": threshold,
                                                        "splice_window": 2})
        engine = build_engine(config)
        task = JsonlTask(config.data)
        examples = list(task.examples("train", 8, 0))
        batch = batch_of(config, task, engine, examples, seed=5)
        return engine, task, examples, batch

    engine, task, examples, batch = spliced(1e9)  # no failure: y_o comes back whole
    tokenize = Tokenize(engine.tokenizer)
    signals, lengths = torch.zeros(8, 6), torch.zeros(8, dtype=torch.int64)
    for b, example in enumerate(examples):
        y_o = batch.originals[b]
        assert torch.equal(batch.completions[b], y_o)
        logits = teacher_forward(engine.teacher.model, tokenize(task.teacher_prompt(example, False)), y_o)
        signals[b, :len(y_o)] = -trd_fast.token_logprobs(logits, y_o)
        lengths[b] = len(y_o)
    trailing = (signals + signals.roll(1, dims=1)) / 2  # window 2 (position 0 is checked against its own value)
    threshold = trailing[:, 1:].max(dim=1).values.median().item()  # about half the rows fail
    _, first = trd_fast.prefix_scan(signals, lengths, threshold=threshold, window=2)
    assert 0 < (first < lengths).sum() < 8, "the fixture should give both failed and clean rows"
    originals = batch.originals
    _, _, _, batch = spliced(threshold)  # the same seed: the same y_o
    assert all(torch.equal(a, b) for a, b in zip(batch.originals, originals))
    assert torch.equal(batch.cut, first)
    for b, k in enumerate(first.tolist()):
        assert torch.equal(batch.completions[b][:k], batch.originals[b][:k])


def test_splice_weights_separate_prefix_and_suffix(models, tmp_path):
    config = make_config(models, tmp_path, distill={"mode": "trd_splice", "prefix_weight": 0.25,
                                                    "suffix_weight": 2.0})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    batch = batch_of(config, task, engine, list(task.examples("train", 8, 0)), seed=5)
    for w, k in zip(batch.weights, batch.cut.tolist()):
        assert torch.all(w[:k] == 0.25) and torch.all(w[k:] == 2.0)


def test_gradient_accumulation_matches_one_batch(models, tmp_path):
    config = make_config(models, tmp_path, distill={"mode": "trd"})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    examples = list(task.examples("train", 5, 0))
    batch = batch_of(config, task, engine, examples, seed=1)
    model = engine.student_model
    gradients, losses = [], []
    for pieces in (1, 3):
        model.zero_grad(set_to_none=True)
        result = train_on(model, batch, config.distill, micro_batches=pieces, epistemic_ids=torch.tensor([10]),
                          **heads_of(engine))
        losses.append(result.loss)
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_loss_curve(models, tmp_path, monkeypatch, capsys):
    settings = dict(distill={"mode": "trd_splice"}, optim={"steps": 4, "batch_size": 3, "warmup_steps": 1})
    whole_config = make_config(models, tmp_path / "whole", **settings)
    whole = loop.train(whole_config, JsonlTask(whole_config.data))

    real_step = loop._one_step

    def crash_after_two(config, task, engine, tokenize, examples, step, *rest):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(config, task, engine, tokenize, examples, step, *rest)

    config = make_config(models, tmp_path / "split", **settings)
    monkeypatch.setattr(loop, "_one_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, JsonlTask(config.data))
    monkeypatch.setattr(loop, "_one_step", real_step)
    capsys.readouterr()
    resumed = loop.train(config, JsonlTask(config.data))
    assert "resuming after step 2 of 4" in capsys.readouterr().out
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["y_o_len"] == b["y_o_len"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(models, tmp_path, monkeypatch):
    import trd_fast.trainer.train.step as step_module

    config = make_config(models, tmp_path, optim={"steps": 3})
    real = step_module.train_on
    calls = []

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            result.loss = float("nan")
        return result

    monkeypatch.setattr(loop, "train_on", poisoned)
    with pytest.raises(loop.NonFiniteLoss, match="at step 2"):
        loop.train(config, JsonlTask(config.data))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_sparse_teacher_targets_warn_in_trd(models, tmp_path):
    config = make_config(models, tmp_path, distill={"mode": "trd", "teacher_targets": "top_k", "teacher_top_k": 4},
                         optim={"steps": 1})
    with pytest.warns(UserWarning, match="full-vocabulary"):
        records = loop.train(config, JsonlTask(config.data))
    assert records[0]["sparse_targets"] is True and math.isfinite(records[0]["loss"])


def test_lora_self_teacher_is_the_frozen_base(models, tmp_path):
    pytest.importorskip("peft")
    config = make_config(models, tmp_path, model={"lora_rank": 4}, distill={"mode": "trd", "teacher_source": "self"},
                         optim={"steps": 2, "lr": 5e-2})
    engine = build_engine(config)
    ids = torch.tensor([[1, 4, 19, 13, 20, 12]])
    with torch.no_grad():
        before = engine.teacher.model(input_ids=ids).logits.clone()
    loop.train(config, JsonlTask(config.data), engine=engine)
    with torch.no_grad():
        after_teacher = engine.teacher.model(input_ids=ids).logits
        after_student = engine.student_model(input_ids=ids).logits
    torch.testing.assert_close(after_teacher, before, atol=1e-6, rtol=0)
    assert not torch.allclose(after_student, before, atol=1e-4)
    trainable = [n for n, p in engine.student_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    from trd_fast.trainer.run.loading import load_causal_lm
    merged = load_causal_lm(tmp_path / "student", role="student")  # saved with the adapters merged
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, after_student, atol=1e-5, rtol=1e-5)


def test_tokenizer_mismatch_names_both_models(models, tmp_path):
    other = tmp_path / "other"
    tokenizer = make_tokenizer(other, reverse_words=True)  # the same ids, the words in another order
    make_model(other, "llama", len(tokenizer))
    config = make_config(models, tmp_path, model={"teacher": str(other)})
    with pytest.raises(ValueError) as error:
        build_engine(config)
    assert models["student"] in str(error.value) and str(other) in str(error.value)


def test_bad_paths_and_config_errors_are_clear(models, tmp_path, capsys):
    from trd_fast.cli import main

    def fails(argv, *words):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        message = capsys.readouterr().err.splitlines()[-1]
        assert exit_.value.code == 2 and message.startswith(f"trd-fast {argv[0]}: error:")
        assert all(word in message for word in words), message

    fails(["train", "--set", f"model.student={models['student']}", "--set", "model.teacher=/no/such/model",
           "--set", f"data.train_jsonl={models['data']}", "--set", f"run.output_dir={tmp_path}",
           "--set", "run.progress=false"], "teacher", "/no/such/model")
    fails(["train", "--config", str(tmp_path / "does-not-exist.yaml")], "does-not-exist.yaml")
    fails(["eval", "--set", f"model.student={models['student']}", "--set", f"model.teacher={models['teacher']}",
           "--set", f"data.train_jsonl={models['data']}", "--student", str(tmp_path / "nothing-here")],
          "student", "nothing-here")
    with pytest.raises(ValueError, match="distill.mode"):
        make_config(models, tmp_path, distill={"mode": "rewrite"})
    with pytest.raises(ValueError, match="unknown key"):
        make_config(models, tmp_path, distill={"modee": "trd"})
    with pytest.raises(ValueError, match="optim.micro_batches"):
        make_config(models, tmp_path, optim={"micro_batches": 9})
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        JsonlTask(make_config(models, tmp_path, data={"train_jsonl": str(tmp_path / "nothing.jsonl")}).data)


def test_cli_train_then_eval(models, tmp_path, capsys):
    from trd_fast.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  student: {models['student']}\n  teacher: {models['teacher']}\n"
                      f"data:\n  train_jsonl: {models['data']}\n  eval_examples: 8\n"
                      f"rollout:\n  max_new_tokens: 5\noptim:\n  steps: 1\n  batch_size: 2\n"
                      f"run:\n  output_dir: {tmp_path / 'run'}\n  progress: false\n")
    main(["train", "--config", str(config), "--set", "distill.mode=trd_splice"])
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    main(["eval", "--config", str(config), "--output", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["problems"] == 8 and 0.0 <= result["accuracy"] <= 1.0


OPD_LOSSES = {  # opd_loss -> the fused loss's options it must select
    "reverse_kl": dict(divergence="reverse_kl"),
    "forward_kl": dict(divergence="forward_kl"),
    "clipped_forward_kl": dict(divergence="forward_kl", clip=0.05),
    "top_k_reverse_kl": dict(divergence="reverse_kl", top_k=3),
    "jsd": dict(divergence="jsd", beta=0.3),
}


@pytest.mark.parametrize("opd_loss", sorted(OPD_LOSSES))
def test_opd_baselines_select_their_loss(models, tmp_path, opd_loss):
    config = make_config(models, tmp_path, distill={"mode": "opd", "opd_loss": opd_loss, "clip": 0.05,
                                                    "loss_top_k": 3, "jsd_beta": 0.3})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    batch = batch_of(config, task, engine, list(task.examples("train", 4, 0)), seed=2)
    model = engine.student_model
    result = train_on(model, batch, config.distill, micro_batches=1, epistemic_ids=torch.tensor([10]),
                      **heads_of(engine))
    with torch.no_grad():
        student = torch.cat([teacher_forward(model, x, y) for x, y in zip(batch.contexts, batch.completions)])
    teacher = implied(engine.teacher.model, torch.cat(batch.targets))
    expected = trd_fast.distillation_loss(student.double(), teacher.double(), backend="torch", **OPD_LOSSES[opd_loss])
    assert result.loss == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    # entropy and epistemic mass over the loss's support: the common columns (the teacher is padded), or top-k
    s, t = student.double(), teacher[:, :student.shape[-1]].double()
    columns = torch.arange(s.shape[-1]).expand_as(s)
    if "top_k" in OPD_LOSSES[opd_loss]:
        columns = t.topk(3, dim=-1).indices
        s, t = s.gather(-1, columns), t.gather(-1, columns)
    entropy = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert result.entropy == pytest.approx(float(entropy), rel=1e-4)
    mass = (torch.softmax(t, -1) * (columns == 10)).sum(-1).mean()
    assert result.epistemic_mass == pytest.approx(float(mass), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("signal", ["log_ratio", "divergence"])
def test_splice_signals_match_a_fresh_computation(models, tmp_path, signal):
    def spliced(threshold):
        config = make_config(models, tmp_path, distill={"mode": "trd_splice", "splice_signal": signal,
                                                        "splice_threshold": threshold})
        engine = build_engine(config)
        task = JsonlTask(config.data)
        examples = list(task.examples("train", 8, 0))
        batch = batch_of(config, task, engine, examples, seed=5)
        return engine, task, examples, batch

    engine, task, examples, batch = spliced(1e9)
    tokenize = Tokenize(engine.tokenizer)
    signals, lengths = torch.zeros(8, 6), torch.zeros(8, dtype=torch.int64)
    for b, example in enumerate(examples):
        y_o = batch.originals[b]
        student = teacher_forward(engine.student_model, tokenize(task.student_prompt(example)), y_o)
        teacher = teacher_forward(engine.teacher.model, tokenize(task.teacher_prompt(example, False)), y_o)
        if signal == "log_ratio":
            value = trd_fast.token_logprobs(student, y_o) - trd_fast.token_logprobs(teacher, y_o)
        else:
            value = trd_fast.reference.per_position_divergence(student.double(), teacher.double(),
                                                               divergence="reverse_kl").float()
        signals[b, :len(y_o)] = value
        lengths[b] = len(y_o)
    threshold = signals.max(dim=1).values.median().item() - 1e-3
    _, first = trd_fast.prefix_scan(signals, lengths, threshold=threshold, window=1)
    assert 0 < (first < lengths).sum() < 8
    _, _, _, batch = spliced(threshold)
    assert torch.equal(batch.cut, first)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(models, tmp_path, monkeypatch):
    import trd_fast.trainer.run.checkpoint as checkpoint

    config = make_config(models, tmp_path, optim={"steps": 2})
    loop.train(config, JsonlTask(config.data))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def crash_midway(state, path):
        real_save({"partial": True}, path)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    resumed = make_config(models, tmp_path, optim={"steps": 3})
    with pytest.raises(OSError, match="disk full"):
        loop.train(resumed, JsonlTask(resumed.data))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_resume_refuses_a_changed_recipe_and_allows_a_longer_run(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    first = make_config(models, out, optim={"steps": 1, "batch_size": 2})
    loop.train(first, JsonlTask(first.data))
    real_build = loop.build_engine

    def refused(changed: dict, message: str) -> None:  # stops before any model is loaded, leaving the run's files
        files = {name: (out / name).read_bytes() for name in (CONFIG, "metrics.jsonl", CHECKPOINT)}
        monkeypatch.setattr(loop, "build_engine", lambda config: pytest.fail("a model was loaded"))
        config = make_config(models, out, **changed)
        with pytest.raises(ValueError, match=rf"^config {message} in the config that trained the checkpoint "
                                             r"\(.*checkpoint\.pt\); set it back, or run\.resume: false"):
            loop.train(config, JsonlTask(config.data))
        monkeypatch.setattr(loop, "build_engine", real_build)
        assert {name: (out / name).read_bytes() for name in files} == files

    refused({"optim": {"steps": 2, "batch_size": 2, "lr": 3e-4}}, r"optim\.lr: 0\.0003 here but 0\.001")
    refused({"optim": {"steps": 2, "batch_size": 2}, "run": {"seed": 7}}, r"run\.seed: 7 here but 0")
    longer = make_config(models, out, optim={"steps": 2, "batch_size": 2, "micro_batches": 2},
                         data={"eval_examples": 4}, run={"eval_every": 2})
    capsys.readouterr()
    records = loop.train(longer, JsonlTask(longer.data))
    assert "resuming after step 1 of 2" in capsys.readouterr().out and [r["step"] for r in records] == [1, 2]
    assert "steps: 2" in (out / CONFIG).read_text(encoding="utf-8")
    state = torch.load(out / CHECKPOINT, weights_only=False)     # a checkpoint of a version that kept no config
    del state["config"]
    torch.save(state, out / CHECKPOINT)
    older = make_config(models, out, optim={"steps": 3, "batch_size": 2, "lr": 3e-4})
    assert [r["step"] for r in loop.train(older, JsonlTask(older.data))] == [1, 2, 3]
    assert "resuming after step 2 of 3" in capsys.readouterr().out
    # A run told to start over removes the checkpoint with the metrics, even when it stops before its own first one,
    # so no later resume can continue the old state under its config and metrics.
    monkeypatch.setattr(loop, "_one_step", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("stopped")))
    over = make_config(models, out, optim={"steps": 2, "batch_size": 2, "lr": 2e-4}, run={"resume": False})
    with pytest.raises(KeyboardInterrupt):
        loop.train(over, JsonlTask(over.data))
    monkeypatch.undo()
    assert not (out / CHECKPOINT).exists() and (out / "metrics.jsonl").read_text() == ""
    assert (out / "student" / "config.json").is_file()          # what is not a checkpoint stays
    again = make_config(models, out, optim={"steps": 1, "batch_size": 2, "lr": 2e-4})   # the start-over's recipe
    assert [r["step"] for r in loop.train(again, JsonlTask(again.data))] == [1]


def test_an_unreadable_checkpoint_stops_the_run_naming_it(models, tmp_path):
    config = make_config(models, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^checkpoint .*checkpoint\.pt cannot be read \(not a file torch\.save "
                                         r"wrote\)"):
        loop.train(config, JsonlTask(config.data))
    with zipfile.ZipFile(tmp_path / CHECKPOINT, "w") as archive:  # a zip archive, but no torch.save one
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"^checkpoint .*checkpoint\.pt cannot be read \(RuntimeError"):
        loop.train(config, JsonlTask(config.data))
    torch.save({"step": 3}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a training checkpoint of this engine"):
        loop.train(config, JsonlTask(config.data))


def test_starting_over_removes_only_the_checkpoints_it_wrote(tmp_path):
    for name in ("step-2", "step-3.tmp", "step-x", "mine"):
        (tmp_path / CHECKPOINTS / name).mkdir(parents=True)
    (tmp_path / CHECKPOINTS / "notes.txt").write_text("kept")
    for name in (CHECKPOINT, f".{CHECKPOINT}.tmp-123", "checkpoint.pt.bak"):
        (tmp_path / name).write_text("x")
    discard_sharded(tmp_path)
    discard_checkpoint(tmp_path)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["mine", "notes.txt", "step-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt.bak", CHECKPOINTS]
    for name in ("mine", "step-x", "notes.txt"):
        target = tmp_path / CHECKPOINTS / name
        target.rmdir() if target.is_dir() else target.unlink()
    (tmp_path / CHECKPOINTS / "step-4").mkdir()
    discard_sharded(tmp_path)
    assert not (tmp_path / CHECKPOINTS).exists()             # emptied of what it wrote, the folder goes too


def test_a_resume_that_would_miss_the_other_kind_of_checkpoint_is_refused(models, tmp_path):
    (tmp_path / CHECKPOINTS / "step-2").mkdir(parents=True)       # written under torchrun
    config = make_config(models, tmp_path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / CHECKPOINTS))} was written by a run under "
                                         r"torchrun: resume it the same way, or set run\.resume=false$"):
        loop.train(config, JsonlTask(config.data))
