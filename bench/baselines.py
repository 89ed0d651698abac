"""The idiomatic torch baselines the fused kernels race against (not the test oracle, trd_fast.reference).

What a user writes without trd_fast: log_softmax of both logits, then F.kl_div (or the JSD mixture), then
autograd. Computed in the logits' own dtype, as TRL's GKD loss does (log_softmax and the reductions
accumulate in fp32 internally; the [N, V] intermediates keep the input dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trd_fast.reference import effective_divergence


def eager_loss(student: torch.Tensor, teacher: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Mean over positions of the per-position divergence; student [N, V] (grad), teacher [N, V]."""
    divergence = effective_divergence(divergence, beta)
    log_p = F.log_softmax(student, dim=-1)  # [N, V] student log-probs
    log_q = F.log_softmax(teacher.detach(), dim=-1)  # [N, V] teacher log-probs
    if divergence == "forward_kl":  # sum q (log q - log p)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    if divergence == "reverse_kl":  # sum p (log p - log q)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    if divergence != "jsd":
        raise ValueError(f"divergence: expected forward_kl, reverse_kl or jsd, got {divergence!r}")
    # log M = log((1 - beta) p + beta q); jsd = beta KL(q || M) + (1 - beta) KL(p || M)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))  # [N, V]
    return (beta * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True))


def eager(divergence: str, beta: float = 0.5):
    """The eager baseline as a two-argument loss function."""

    def loss(student, teacher):
        return eager_loss(student, teacher, divergence, beta)

    return loss


def compiled(divergence: str, beta: float = 0.5):
    """torch.compile of the eager baseline: static shapes, a fresh function (own cache entry) per case."""
    return torch.compile(eager(divergence, beta), dynamic=False)


# Liger-Kernel's generalized JSD takes log-probs: input = student log Q, target = teacher log P, and
#   JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q,
# with beta = 0 -> KL(P || Q) (forward KL) and beta = 1 -> KL(Q || P) (reverse KL): the same beta as ours
# (M = (1 - beta) p + beta q, p student, q teacher). Its loss is the sum over rows / N (batchmean), returned
# in the input dtype; it computes dL/dlogQ during the forward and keeps it ([N, V]) for the backward.
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:  # not installed, or does not import against this torch / triton
        return False
    return True


def liger(divergence: str, beta: float = 0.5):
    """Liger-Kernel's pipeline: log_softmax of student and teacher, then LigerJSD with the matching beta."""
    from liger_kernel.transformers.jsd import LigerJSD

    jsd = LigerJSD(beta=LIGER_BETA.get(divergence, beta))

    def loss(student, teacher):
        log_p = F.log_softmax(student, dim=-1)  # [N, V] student log-probs (Liger's log_q)
        log_q = F.log_softmax(teacher.detach(), dim=-1)  # [N, V] teacher log-probs (Liger's log_p)
        return jsd(log_p, log_q)

    return loss
