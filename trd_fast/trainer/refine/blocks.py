"""The step's rows in blocks whose rollout and refinement fit `run.memory_budget_mb`: each block is rolled out and
refined on its own, one after another, and the blocks' batches are joined in row order, so a step's peak memory
follows the budget, not the batch size times the sequence length.

Bytes a row holds while it is generated (an estimate; the larger of the student's rollout and the teacher's
refinement):
    KV cache   kv_bytes(model) x (CACHE_COPIES x positions + MIN_ROOM)
                                        positions: its longest prompt + 2 x max_new_tokens (the refine prompt holds
                                        y_o, then y_r follows); the cache with its room to grow (rollout/kv_cache.py:
                                        GROWTH, MIN_ROOM) beside the compact copy that dropping finished rows or
                                        realigning cut rows makes. Not counted: a drafted forward's rejected slots,
                                        masked but kept while a longer accepted run of another row follows them, and
                                        realign's per-layer temporaries.
    logits     LOGIT_TEMPORARIES x 4 x V x (1 + draft_tokens) (a decode step's fp32 rows, a drafted forward's slots)
where kv_bytes = 2 (keys, values) x layers x kv_heads x head_dim x bytes per value. With the default budget the
shipped task's batch is one block; at 8B-scale models a few rows fit each GiB, and a GPU run raises the budget.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes
from trd_fast.trainer.refine.stats import combine_stats
from trd_fast.trainer.rollout.capture import LOGIT_TEMPORARIES
from trd_fast.trainer.rollout.kv_cache import GROWTH, MIN_ROOM
from trd_fast.trainer.train.batch import Batch

CACHE_COPIES = 2 + GROWTH  # a batch's KV cache with its room to grow, beside the compact copy that dropping
                          # finished rows or realigning cut rows makes (growing copies one layer at a time)


def kv_bytes(model) -> int:
    """Bytes of keys and values the model caches per position (all layers)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * size


def row_bytes(request: BatchRequest) -> int:
    """Estimated bytes one row holds while it is rolled out and refined (the module docstring)."""
    r, d = request.config.rollout, request.config.distill
    tokenize, task, privileged = request.tokenize, request.task, request.privileged
    student_prompt = max(len(tokenize(task.student_prompt(e))) for e in request.examples)
    teacher_prompt = max(max(len(tokenize(task.teacher_prompt(e, privileged))),
                             len(tokenize(task.refine_prompt(e, "", privileged)))) for e in request.examples)
    student = kv_bytes(request.student.model) * (CACHE_COPIES * (student_prompt + r.max_new_tokens) + MIN_ROOM)
    teacher = kv_bytes(request.teacher.model) * (CACHE_COPIES * (teacher_prompt + 2 * r.max_new_tokens) + MIN_ROOM)
    vocab = max(request.student.head.weight.shape[0], request.teacher.head.weight.shape[0])
    logits = LOGIT_TEMPORARIES * 4 * vocab * (1 + d.draft_tokens)
    return math.ceil(max(student, teacher) + logits)


def split_rows(request: BatchRequest) -> list[BatchRequest]:
    """The request split into consecutive row blocks of at most budget / row_bytes rows each (at least one)."""
    rows = len(request.examples)
    budget, per_row = request.config.budget_bytes, row_bytes(request)
    if budget < per_row and rows > 1:
        warnings.warn(f"run.memory_budget_mb ({budget / 2**20:.3g} MiB) is below one row's estimated "
                      f"{per_row / 2**20:.3g} MiB for rollout and refinement: rows go one at a time", stacklevel=2)
    size = max(1, min(rows, math.floor(budget / per_row)))
    return [dataclasses.replace(request, examples=request.examples[lo:lo + size],
                                row_ids=request.row_ids[lo:lo + size]) for lo in range(0, rows, size)]


def join(parts: list[tuple[Batch, PhaseTimes]]) -> tuple[Batch, PhaseTimes]:
    """The batches of consecutive row blocks as one batch (rows in order; statistics over all rows), and the
    blocks' phase times added up."""
    if len(parts) == 1:
        return parts[0]
    batches = [b for b, _ in parts]
    cuts = [b.cut for b in batches]
    batch = Batch(contexts=[x for b in batches for x in b.contexts],
                  completions=[y for b in batches for y in b.completions],
                  targets=[t for b in batches for t in b.targets],
                  weights=[w for b in batches for w in b.weights],
                  originals=[y for b in batches for y in b.originals],
                  cut=None if cuts[0] is None else torch.cat(cuts),
                  stats=combine_stats([b.stats for b in batches], [len(b.contexts) for b in batches]))
    times = PhaseTimes(rollout=sum(t.rollout for _, t in parts), refine=sum(t.refine for _, t in parts))
    return batch, times
