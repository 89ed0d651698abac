"""Data files: UTF-8 whatever the locale, and the data set checked before the first step with errors naming the
file and the line (bad JSON, missing or mistyped keys, empty prompts, prompts that do not fit a model)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_pair, write_jsonl
from trd_fast.tasks.jsonl import JsonlTask, read_examples
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import CONFIG, from_dict

ROOT = Path(__file__).resolve().parents[1]
UNICODE = "café — ✓ 😀 日本語"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    student, teacher = make_pair(root)
    return {"student": str(student), "teacher": str(teacher)}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_line(i: int) -> str:
    return json.dumps({"prompt": f"Solve {i} + 1 :", "solution": f"{i} + 1 = {i + 1}", "answer": str(i + 1)})


def config_for(models, data_file: Path, out: Path, **sections):
    raw = {"model": {"student": models["student"], "teacher": models["teacher"]},
           "data": {"train_jsonl": str(data_file), "eval_examples": 8},
           "rollout": {"max_new_tokens": 6},
           "optim": {"steps": 2, "batch_size": 4, "lr": 1e-3},
           "run": {"output_dir": str(out), "progress": False, "checkpoint_every": 1, "save_student": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def test_utf8_files_train_and_eval_under_an_ascii_locale(models, tmp_path):
    data = write_lines(tmp_path / "train.jsonl", [json.dumps({"prompt": f"Solve {i} + 1 : {UNICODE}",
                                                              "solution": UNICODE, "answer": str(i + 1)},
                                                             ensure_ascii=False) for i in range(8)])
    config = tmp_path / "run.yaml"
    config.write_text(f"# {UNICODE}\nmodel:\n  student: {models['student']}\n  teacher: {models['teacher']}\n"
                      f"data:\n  train_jsonl: {data}\n  eval_examples: 4\n  prompt_template: \"✓ {{prompt}}\\n\"\n"
                      f"rollout:\n  max_new_tokens: 4\noptim:\n  steps: 1\n  batch_size: 2\n"
                      f"run:\n  output_dir: {tmp_path / 'run'}\n  progress: false\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0")
    commands = [["train", "--config", str(config)],
                ["eval", "--config", str(config), "--output", str(tmp_path / "eval.json")]]
    script = f"from trd_fast.cli import main\nfor argv in {commands!r}:\n    main(argv)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    written = (tmp_path / "run" / CONFIG).read_text(encoding="utf-8")
    assert "✓ {prompt}" in written  # the config dump is readable UTF-8, not escapes
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])["step"] == 1
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["problems"] == 4


def test_jsonl_reader_accepts_utf8_with_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"{UNICODE} {i}", "answer": i}, ensure_ascii=False) for i in range(3)]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    examples = read_examples(path)
    assert [e.prompt for e in examples] == [f"{UNICODE} {i}" for i in range(3)]
    assert [e.answer for e in examples] == ["0", "1", "2"]
    assert [e.origin for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]


BAD_LINES = {  # line 6 of 8 -> what the error says after "FILE:6: "
    '{"prompt": ""}': "'prompt' is empty",
    '{"prompt": "  \\n "}': "'prompt' is empty",
    '{"prompt": 7}': "'prompt' must be a string, got int",
    '{"prompt": null}': "'prompt' must be a string, got NoneType",
    '{"question": "Solve 1 + 1 :"}': "missing key 'prompt' (keys: ['question'])",
    '["Solve 1 + 1 :"]': "expected a JSON object, got list",
    '{"prompt": "Solve 1 + 1 :"': "not valid JSON",
    '{"prompt": "Solve 1 + 1 :", "answer": [2]}': "'answer' must be a non-empty string or a finite number",
    '{"prompt": "Solve 1 + 1 :", "answer": true}': "'answer' must be",
    '{"prompt": "Solve 1 + 1 :", "answer": NaN}': "'answer' must be",
    '{"prompt": "Solve 1 + 1 :", "answer": ""}': "'answer' must be",
    '{"prompt": "Solve 1 + 1 :", "solution": {"steps": 1}}': "'solution' must be",
}


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line):
    path = write_lines(tmp_path / "data.jsonl", [good_line(i) for i in range(5)] + [line] + [good_line(6),
                                                                                              good_line(7)])
    with pytest.raises(ValueError) as error:
        read_examples(path)
    message = str(error.value)
    assert message.startswith(f"{path}:6: ") and BAD_LINES[line] in message and "\n" not in message


def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_examples(path)


def test_an_empty_prompt_stops_the_cli_before_any_work(models, tmp_path, capsys):
    from trd_fast.cli import main

    data = write_lines(tmp_path / "train.jsonl", [good_line(i) for i in range(5)] + ['{"prompt": ""}']
                       + [good_line(6), good_line(7)])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--set", f"model.student={models['student']}", "--set", f"model.teacher={models['teacher']}",
              "--set", f"data.train_jsonl={data}", "--set", f"run.output_dir={out}", "--set", "run.progress=false",
              "--set", "optim.steps=2", "--set", "optim.batch_size=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0] == f"trd-fast train: error: {data}:6: 'prompt' is empty"
    assert not out.exists()


def long_prompt(tokens: int) -> str:
    # the tiny tokenizer: <s> + one token per word
    return " ".join(["1"] * (tokens - 1))


@pytest.mark.parametrize("mode, prompt_tokens, max_new_tokens, what", [
    ("trd", 300, 6, "the student prompt is 300 tokens"),          # longer than the context on its own
    ("opd", 252, 6, "the student prompt is 252 tokens"),          # fits alone, not with the rollout
    ("trd", 200, 40, "the refine prompt is"),                      # the rewrite also holds y_o and y_r
])
def test_a_prompt_that_does_not_fit_the_context_is_named_before_the_first_step(models, tmp_path, mode,
                                                                               prompt_tokens, max_new_tokens, what):
    lines = [good_line(i) for i in range(8)]
    lines[2] = json.dumps({"prompt": long_prompt(prompt_tokens), "answer": "1"})
    data = write_lines(tmp_path / "train.jsonl", lines)
    config = config_for(models, data, tmp_path / "run", rollout={"max_new_tokens": max_new_tokens},
                        data={"prompt_template": "{prompt}", "refine_template": "{prompt} {attempt}"},
                        distill={"mode": mode})
    with pytest.raises(ValueError) as error:
        loop.train(config, JsonlTask(config.data))
    message = str(error.value)
    assert message.startswith(f"{data}:3: {what}") and "context of 256 positions" in message, message
    assert not (tmp_path / "run").exists()


def test_eval_examples_are_checked_when_the_run_evaluates(models, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 8)
    held_out = write_lines(tmp_path / "eval.jsonl", [good_line(0), json.dumps({"prompt": long_prompt(260)})])
    config = config_for(models, data, tmp_path / "run", data={"eval_jsonl": str(held_out)}, run={"eval_every": 1})
    with pytest.raises(ValueError, match=f"^{held_out}:2: the student prompt is 260 tokens"):
        loop.train(config, JsonlTask(config.data))


def test_a_self_teacher_needs_every_solution_before_the_first_step(models, tmp_path):
    lines = [good_line(i) for i in range(8)]
    lines[3] = json.dumps({"prompt": "Solve 3 + 1 :", "answer": "4"})
    data = write_lines(tmp_path / "train.jsonl", lines)
    config = config_for(models, data, tmp_path / "run", distill={"teacher_source": "self"})
    with pytest.raises(ValueError, match=f"^{data}:4: cannot form its prompts .*'solution'"):
        loop.train(config, JsonlTask(config.data))
    assert not (tmp_path / "run").exists()


# Text-mode file and process I/O that would use the locale's encoding unless told otherwise.
def _implicit_encoding_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if "encoding" in keywords:
            continue
        mode = node.args[1] if name == "open" and len(node.args) > 1 else keywords.get("mode")
        binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
        text_process = any(isinstance(keywords.get(k), ast.Constant) and keywords[k].value is True
                           for k in ("text", "universal_newlines"))
        if (name == "open" and not binary) or name in ("read_text", "write_text") or text_process:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_every_text_file_the_project_reads_or_writes_names_its_encoding():
    sources = [p for folder in ("trd_fast", "kernels", "bench", ".ci") for p in sorted((ROOT / folder).rglob("*.py"))]
    sources.append(ROOT / "setup.py")
    offenders = [call for path in sources for call in _implicit_encoding_calls(path)]
    assert not offenders, offenders


def test_the_rows_checked_are_the_rows_the_run_feeds():
    for steps, batch_size, count in ((3, 4, 100), (5, 8, 30), (0, 4, 10)):
        fed = {r for step in range(steps) for r in loop.batch_positions(step, batch_size, count, seed=7)}
        assert loop.rows_fed(steps, batch_size, count, seed=7) == sorted(fed)


def test_eval_checks_the_held_out_prompts(models, tmp_path, capsys):
    from trd_fast.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", 8)
    held_out = write_lines(tmp_path / "eval.jsonl", [good_line(0), json.dumps({"prompt": long_prompt(300)})])
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--set", f"model.student={models['student']}", "--set", f"model.teacher={models['teacher']}",
              "--set", f"data.train_jsonl={data}", "--set", f"data.eval_jsonl={held_out}",
              "--student", models["student"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert err[-1].startswith(f"trd-fast eval: error: {held_out}:2: the prompt is 300 tokens; with 128 more "
                              "(max_new_tokens) it exceeds the model's context of 256 positions"), err
