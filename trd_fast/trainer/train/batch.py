"""The training step's input: per row the student's context, the trained completion, its teacher targets and
loss weights, as the refinement of one mode built them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trd_fast.trainer.rollout.capture import Target


@dataclass
class Batch:
    contexts: list[Tensor]        # the student's context x per row, 1-D int64
    completions: list[Tensor]     # the trained completion per row (y_o or y_r), 1-D int64
    targets: list[Target]         # per row the teacher's target of each token: its final hidden states
                                  # [len(completion), H_t] (model dtype) or its top-k log-probs (SparseTeacher)
    weights: list[Tensor]         # per row [len(completion)] fp32 loss weights
    originals: list[Tensor]       # the student's rollout y_o per row
    cut: Tensor | None            # trd_splice: [B] failure point k per row (len(y_o) where none); else None
    stats: dict[str, float] = field(default_factory=dict)  # refinement metrics of this batch
