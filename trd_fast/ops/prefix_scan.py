"""prefix_scan: per-trajectory cumulative signal and the first position where its trailing mean exceeds a
threshold (the splice point of TRD-splice). Not differentiable."""

from __future__ import annotations

from numbers import Integral

import torch

from trd_fast import reference
from trd_fast.ops import checks
from trd_fast.ops.registry import opset, resolve


def prefix_scan(signal, lengths, *, threshold, window=1, backend=None):
    """signal [B, L] float, lengths [B] integer -> (cumsum [B, L] signal dtype, first [B] int64).

    cumsum[b, t] = sum(signal[b, :t+1]) for t < lengths[b], else 0. first[b] = the smallest t < lengths[b]
    whose mean over positions max(0, t-window+1)..t is > threshold, else lengths[b].
    """
    checks.float_tensor("signal", signal)
    if signal.dim() != 2:
        raise ValueError(f"signal: expected shape [B, L], got {tuple(signal.shape)}")
    checks.integer_tensor("lengths", lengths)
    checks.same_shape("lengths", lengths.shape, "signal batch", signal.shape[:1])
    checks.same_device("lengths", lengths, "signal", signal)
    threshold = checks.real("threshold", threshold)
    if isinstance(window, bool) or not isinstance(window, Integral) or window < 1:
        raise ValueError(f"window: expected an integer >= 1, got {window!r}")
    width = signal.shape[1]
    if checks.values_checkable(lengths) and lengths.numel():
        if not bool(((lengths >= 0) & (lengths <= width)).all()):
            raise ValueError(f"lengths: expected values in [0, {width}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
    signal, lengths = signal.detach(), lengths.to(torch.int64)
    name = resolve(backend, signal.device)
    if name == "torch":
        return reference.prefix_scan(signal, lengths, threshold=threshold, window=int(window))
    return opset(name).op("prefix_scan")(signal, lengths.contiguous(), threshold, int(window))
