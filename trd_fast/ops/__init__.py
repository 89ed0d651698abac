"""The public ops: argument checks, backend dispatch and autograd over the kernel backends."""

import os

import torch

from trd_fast.ops.backend import triton_installed, triton_interpreted
from trd_fast.ops.distillation import distillation_loss
from trd_fast.ops.fused_linear import fused_linear_distillation_loss
from trd_fast.ops.options import LossOptions
from trd_fast.ops.prefix_scan import prefix_scan
from trd_fast.ops.sparse_teacher import SparseTeacher
from trd_fast.ops.token_logprobs import token_logprobs

# Register the Triton ops up front where they can run, so torch.compile never traces an import.
if triton_installed() and (triton_interpreted() or torch.cuda.is_available()) \
        and os.environ.get("TRD_FAST_NO_TRITON", "0") != "1":
    from trd_fast.ops import triton_ops  # noqa: F401

__all__ = ["distillation_loss", "fused_linear_distillation_loss", "token_logprobs", "prefix_scan", "SparseTeacher",
           "LossOptions"]
