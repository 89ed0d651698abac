"""Drawing the next token from raw logits: temperature, top-k, top-p, greedy."""

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
    if vocab_size is not None:
        logits = logits[:, :vocab_size]                                     # [N, V']
    if config.temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / config.temperature
    if 0 < config.top_k < scaled.shape[-1]:
        kth = scaled.topk(config.top_k, dim=-1).values[:, -1:]             # [N, 1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)                                  # [N, V']
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p      # mass before a token already enough
        probs = probs.masked_fill(drop.new_zeros(drop.shape).scatter(-1, order, drop), 0.0)
    cdf = probs.cumsum(-1)                                                 # [N, V']
    u = torch.rand(len(cdf), generator=generator, device=generator.device).to(cdf.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp(max=cdf.shape[-1] - 1)
