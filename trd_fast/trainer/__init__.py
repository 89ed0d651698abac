"""The TRD engine: student rollouts, teacher refinement (rewrite or splice), the fused-loss training step."""

import transformers

from trd_fast.dependencies import check_version

check_version("transformers", transformers.__version__, "trd_fast.trainer")
