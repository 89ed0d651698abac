"""A task read from JSONL files: one {"prompt", optional "solution", optional "answer"} object per line,
formatted with the data config's templates and checked by a final-answer regex."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

from trd_fast.text_files import read_utf8
from trd_fast.trainer.protocol import Example
from trd_fast.trainer.run.config import DataConfig


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file (UTF-8; blank lines skipped), checked line by line: a JSON object with a
    non-empty string "prompt" and optional non-empty string (or finite number) "solution" and "answer".
    Raises ValueError naming the file and the line, FileNotFoundError when there is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    examples = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "prompt" not in record:
            raise ValueError(f"{where}: missing key 'prompt' (keys: {sorted(record)})")
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{where}: 'prompt' is empty")
        examples.append(Example(prompt=prompt, solution=_optional_text(record, "solution", where),
                                answer=_optional_text(record, "answer", where), origin=where))
    if not examples:
        raise ValueError(f"data file {str(path)!r} holds no examples")
    return examples


def _optional_text(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string or a finite number, got {value!r}")
    return value


class JsonlTask:
    def __init__(self, config: DataConfig):
        self.config = config
        self.splits = {"train": read_examples(config.train_jsonl),
                       "eval": read_examples(config.eval_jsonl or config.train_jsonl)}
        self.answer = re.compile(config.answer_pattern)

    def student_prompt(self, example: Example) -> str:
        return self.config.prompt_template.format(prompt=example.prompt)

    def teacher_prompt(self, example: Example, privileged: bool) -> str:
        if privileged:
            return self.config.privileged_template.format(prompt=example.prompt, solution=_solution(example))
        return self.config.teacher_template.format(prompt=example.prompt)

    def refine_prompt(self, example: Example, attempt: str, privileged: bool) -> str:
        prompt = self.config.refine_template.format(prompt=example.prompt, attempt=attempt)
        if privileged:
            prompt = f"Reference solution: {_solution(example)}\n{prompt}"
        return prompt

    def verify(self, example: Example, completion: str) -> bool | None:
        if example.answer is None:
            return None
        found = self.answer.findall(completion)
        if not found:
            return False
        last = found[-1]
        return (last[0] if isinstance(last, tuple) else last).strip() == example.answer.strip()

    def examples(self, split: str, count: int, seed: int) -> Sequence[Example]:
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.splits[split][:count]


def _solution(example: Example) -> str:
    if example.solution is None:
        raise ValueError("teacher_source=self needs a reference 'solution' for every example; this one has none")
    return example.solution
