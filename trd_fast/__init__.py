"""trd_fast: fused divergence kernels and a Trajectory-Refined Distillation engine."""

from trd_fast.losses import DistillationLoss, FusedLinearDistillationLoss
from trd_fast.ops import (LossOptions, SparseTeacher, distillation_loss, fused_linear_distillation_loss, prefix_scan,
                          token_logprobs)

__version__ = "0.1.0"

__all__ = ["distillation_loss", "fused_linear_distillation_loss", "token_logprobs", "prefix_scan", "DistillationLoss",
           "FusedLinearDistillationLoss", "SparseTeacher", "LossOptions", "__version__"]
