"""Validated scalar options of distillation_loss, shared by the function and the module."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from trd_fast.constants import DIVERGENCES
from trd_fast.ops import checks
from trd_fast.reference import effective_divergence

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossOptions:
    divergence: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "jsd"
    beta: float = 0.5  # jsd interpolation: 0 -> forward_kl, 1 -> reverse_kl, else the generalized JSD
    temperature: float = 1.0  # both logits are divided by it (no T^2 factor)
    top_k: int | None = None  # restrict both distributions to the teacher's top-k ids, renormalized
    clip: float | None = None  # per-position l -> min(l, clip), zero gradient where l > clip
    reduction: str = "mean"  # "mean" | "sum" | "none"

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")
        beta = checks.real("beta", self.beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta: expected a value in [0, 1], got {self.beta!r}")
        temperature = checks.temperature(self.temperature)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an integer >= 1, got {self.top_k!r}")
        if self.clip is not None and not checks.real("clip", self.clip) >= 0:
            raise ValueError(f"clip: expected None or a value >= 0, got {self.clip!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "clip", None if self.clip is None else float(self.clip))
        object.__setattr__(self, "top_k", None if self.top_k is None else int(self.top_k))

    @property
    def kernel_kind(self) -> tuple[int, float]:
        """(kind code, beta) for the kernels: jsd at beta 0 or 1 runs as the KL it equals (beta then unused)."""
        divergence = effective_divergence(self.divergence, self.beta)
        return DIVERGENCES.index(divergence), self.beta if divergence == "jsd" else 0.0
