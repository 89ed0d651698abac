"""Constants with one definition each, shared by the ops, the oracle, the integrations and the kernels.

The Triton kernels (kernels/) read these through module-level tl.constexpr values; the C++ kernels name the
same numbers in csrc/cpu/constants.h. tests/test_constants.py checks that the three languages agree.
"""

import torch

# The divergences of distillation_loss, in the order of their kernel codes (the `kind` argument of the
# divergence ops): DIVERGENCES[FORWARD_KL] == "forward_kl".
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2

# The token id that marks a position to ignore (token_logprobs gives 0 there; HF labels use it for padding).
IGNORE_INDEX = -100

# The logit dtypes every op accepts.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
