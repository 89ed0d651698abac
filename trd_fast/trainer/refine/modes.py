"""The batch builder of each distill.mode: rollout y_o, refinement y_r and the teacher targets of one step."""

from __future__ import annotations

from trd_fast.trainer.refine.blocks import join, split_rows
from trd_fast.trainer.refine.opd import opd_batch
from trd_fast.trainer.refine.request import BatchRequest, PhaseTimes
from trd_fast.trainer.refine.rewrite import rewrite_batch
from trd_fast.trainer.refine.splice_batch import splice_batch
from trd_fast.trainer.train.batch import Batch

BUILDERS = {"opd": opd_batch, "trd": rewrite_batch, "trd_splice": splice_batch}


def build_batch(request: BatchRequest) -> tuple[Batch, PhaseTimes]:
    """The configured mode's batch of the request's examples, and the time of each phase: built in row blocks
    that fit run.memory_budget_mb (refine/blocks.py), joined in row order."""
    builder = BUILDERS[request.config.distill.mode]
    return join([builder(block) for block in split_rows(request)])
