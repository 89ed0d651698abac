"""A task read from JSONL files: one {"prompt", optional "solution", optional "answer"} object per line,
formatted with the data config's templates and checked by a final-answer regex."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from trd_fast.trainer.protocol import Example
from trd_fast.trainer.run.config import DataConfig


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string 'prompt'")
        examples.append(Example(prompt=record["prompt"],
                                solution=_optional_text(record, "solution", path, number),
                                answer=_optional_text(record, "answer", path, number)))
    if not examples:
        raise ValueError(f"data file {str(path)!r} holds no examples")
    return examples


def _optional_text(record: dict, key: str, path: Path, number: int) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{path}:{number}: {key!r} must be a string or a number")
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
        return self.splits[split][:count] if count > 0 else self.splits[split]


def _solution(example: Example) -> str:
    if example.solution is None:
        raise ValueError(f"teacher_source=self needs a reference 'solution' for every example; "
                         f"missing for prompt {example.prompt[:60]!r}")
    return example.solution
