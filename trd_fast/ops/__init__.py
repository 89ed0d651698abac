"""The public ops: argument checks, backend dispatch and autograd over the kernel backends."""

from trd_fast.ops import registry
from trd_fast.ops.distillation import distillation_loss
from trd_fast.ops.fused_linear import fused_linear_distillation_loss
from trd_fast.ops.options import LossOptions
from trd_fast.ops.prefix_scan import prefix_scan
from trd_fast.ops.sparse_teacher import SparseTeacher
from trd_fast.ops.token_logprobs import token_logprobs

registry.register()

__all__ = ["distillation_loss", "fused_linear_distillation_loss", "token_logprobs", "prefix_scan", "SparseTeacher",
           "LossOptions"]
