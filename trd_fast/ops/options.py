"""Validated scalar options of distillation_loss, shared by the function and the module."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")

# Kernel codes of the divergences (the `kind` argument of the divergence ops).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    return float(value)


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
        beta = _real("beta", self.beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta: expected a value in [0, 1], got {self.beta!r}")
        temperature = _real("temperature", self.temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: expected a finite value > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an integer >= 1, got {self.top_k!r}")
        if self.clip is not None and not _real("clip", self.clip) >= 0:
            raise ValueError(f"clip: expected None or a value >= 0, got {self.clip!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "clip", None if self.clip is None else float(self.clip))
        object.__setattr__(self, "top_k", None if self.top_k is None else int(self.top_k))

    @property
    def kernel_kind(self) -> tuple[int, float]:
        """(kind code, beta) for the kernels: jsd at beta 0 or 1 is exactly forward / reverse KL."""
        if self.divergence == "forward_kl" or (self.divergence == "jsd" and self.beta == 0.0):
            return FORWARD_KL, 0.0
        if self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.beta == 1.0):
            return REVERSE_KL, 0.0
        return JSD, self.beta

    @property
    def reference_divergence(self) -> str:
        return ("forward_kl", "reverse_kl", "jsd")[self.kernel_kind[0]]
