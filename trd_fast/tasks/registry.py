"""The tasks a run can train on: a shipped task by name (config data.task), or prompts from JSONL files (config
data.train_jsonl). The trainer is task-agnostic; this is where a task is chosen for it."""

from __future__ import annotations

from trd_fast.tasks.chain import ChainTask
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.protocol import Task
from trd_fast.trainer.run.config import DataConfig

SHIPPED = {"chain": ChainTask}  # data.task -> the task's class


def resolve_task(data: DataConfig) -> Task:
    """The JSONL task when data.train_jsonl is set, else the shipped task data.task; ValueError naming
    data.task when there is no such task."""
    if data.train_jsonl:
        return JsonlTask(data)
    if data.task not in SHIPPED:
        raise ValueError(f"config data.task: unknown task {data.task!r}; shipped: {sorted(SHIPPED)}")
    return SHIPPED[data.task]()
