"""Triton kernels of trd_fast (installed as trd_fast.kernels): @triton.jit kernels and their launch helpers.

Each launcher takes the input tensors and preallocated outputs, derives the grid from shapes only (no host
synchronisation) and launches through torch.library.wrap_triton, so torch.compile can trace the launch
inside a torch.library.triton_op. Argument checks, output allocation and dispatch live in trd_fast.ops.
"""

from trd_fast.kernels.divergence import divergence_backward, divergence_forward
from trd_fast.kernels.prefix_scan import segmented_scan
from trd_fast.kernels.token_logprobs import check_token_ids, token_logprobs_backward, token_logprobs_forward

__all__ = ["divergence_forward", "divergence_backward", "token_logprobs_forward", "token_logprobs_backward",
           "check_token_ids", "segmented_scan"]
