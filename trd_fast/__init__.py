"""trd_fast: fused divergence kernels and a Trajectory-Refined Distillation engine."""

import torch

from trd_fast.dependencies import check_version

check_version("torch", torch.__version__, "trd_fast")

from trd_fast.losses import DistillationLoss, FusedLinearDistillationLoss  # noqa: E402
from trd_fast.ops import (LossOptions, SparseTeacher, distillation_loss, fused_linear_distillation_loss,  # noqa: E402
                          prefix_scan, token_logprobs)

__version__ = "0.1.0"

__all__ = ["distillation_loss", "fused_linear_distillation_loss", "token_logprobs", "prefix_scan", "DistillationLoss",
           "FusedLinearDistillationLoss", "SparseTeacher", "LossOptions", "__version__"]
