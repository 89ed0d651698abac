"""token_logprobs: log softmax(logits / T) at the given ids, fused (no [N, V] log-softmax)."""

from __future__ import annotations

import torch

from trd_fast import reference
from trd_fast.constants import IGNORE_INDEX
from trd_fast.ops import checks
from trd_fast.ops.registry import opset, resolve
from trd_fast.ops.rows import as_rows, rows_like


def token_logprobs(logits, token_ids, temperature=1.0, backend=None):
    """logits [..., V], token_ids [...] integer (-100 = ignore) -> log-probs [...] fp32, differentiable.

    Ignored positions give 0 and no gradient.
    """
    checks.logits("logits", logits)
    checks.integer_tensor("token_ids", token_ids)
    checks.same_shape("token_ids", token_ids.shape, "logits leading shape", logits.shape[:-1])
    checks.same_device("token_ids", token_ids, "logits", logits)
    temperature = checks.temperature(temperature)
    vocab = logits.shape[-1]
    if checks.values_checkable(token_ids) and token_ids.numel():
        valid = ((token_ids >= 0) & (token_ids < vocab)) | (token_ids == IGNORE_INDEX)
        if not bool(valid.all()):
            bad = token_ids[~valid][0].item()
            raise ValueError(f"token_ids: expected ids in [0, {vocab}) or {IGNORE_INDEX}, got {bad}")
    name = resolve(backend, logits.device)
    if name == "torch":
        return reference.token_logprobs(logits, token_ids, temperature).to(torch.float32)
    rows = as_rows(logits)
    ids = rows_like(token_ids.to(torch.int64), rows).contiguous()
    logprobs, _ = opset(name).op("token_logprobs")(rows, ids, temperature)
    return logprobs.view(token_ids.shape)
