"""Drawing the next token from raw logits: temperature, top-k, top-p, greedy; the filtered weights and the
inverse-CDF draw are shared with draft verification."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0   # 0 means greedy (argmax of the raw logits)
    top_p: float = 1.0         # nucleus: keep the smallest set of tokens holding this much probability
    top_k: int = 0             # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 128  # tokens a row may generate, EOS included

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator,
           vocab_size: int | None = None) -> Tensor:
    """[N, V] raw logits -> [N] int64 ids drawn from softmax(logits / T) after top-k then top-p filtering.

    Only ids below `vocab_size` are drawn (None: all V). One uniform number per row comes from `generator`, on
    the generator's own device, and picks the token by inverse CDF: the same generator state gives the same
    tokens, and a CPU generator serves logits on any device without moving them.
    """
    if config.temperature == 0:
        return greedy(logits, vocab_size)
    return inverse_cdf(filtered_weights(logits, config, vocab_size), uniform(len(logits), generator))


def greedy(logits: Tensor, vocab_size: int | None = None) -> Tensor:
    """[N, V] raw logits -> [N] int64 argmax among the ids below `vocab_size` (None: all V)."""
    return (logits if vocab_size is None else logits[:, :vocab_size]).argmax(-1)


def filtered_weights(logits: Tensor, config: SamplingConfig, vocab_size: int | None = None) -> Tensor:
    """[N, V] raw logits -> [N, V'] fp32 unnormalised sampling weights over the ids below `vocab_size` (V' of
    them): softmax(logits / T) with the tokens outside the top-k, then outside the top-p nucleus, set to 0.
    The distribution `sample` draws from is each row divided by its sum. Needs temperature > 0."""
    if vocab_size is not None:
        logits = logits[:, :vocab_size]                                     # [N, V']
    scaled = logits.float() / config.temperature
    if 0 < config.top_k < scaled.shape[-1]:
        kth = scaled.topk(config.top_k, dim=-1).values[:, -1:]             # [N, 1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)                                  # [N, V']
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p      # mass before a token already enough
        probs = probs.masked_fill(drop.new_zeros(drop.shape).scatter(-1, order, drop), 0.0)
    return probs


def uniform(count: int, generator: torch.Generator) -> Tensor:
    """[count] fp32 numbers uniform in [0, 1), drawn on the generator's own device."""
    return torch.rand(count, generator=generator, device=generator.device)


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """[N, V] non-negative weights (each row with a positive sum), [N] uniforms in [0, 1) on any device ->
    [N] int64 ids, id i drawn with probability weights[i] / sum(weights)."""
    cdf = weights.cumsum(-1)                                               # [N, V]
    picked = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp(max=cdf.shape[-1] - 1)
