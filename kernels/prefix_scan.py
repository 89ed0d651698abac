"""Segmented prefix scan of a per-token signal: running sums and the first position whose trailing mean exceeds
a threshold (the splice point of TRD-splice).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from trd_fast.kernels.common import cast_for_store, hyper, split
from trd_fast.kernels.configs import scan_tile


# One program per sequence b with n = lengths[b], over tiles of BLOCK_L positions t:
#   cumsum[b, t] = carry + inclusive tl.cumsum of the tile, carry = the last running sum of the previous tile,
#                  accumulated in fp64 (as torch's CPU cumsum does) and stored in the signal dtype; 0 for t >= n.
#   mean[b, t]   = sum_{u = max(0, t - window + 1)}^{t} x[u] / min(t + 1, window), the window summed directly,
#                  oldest position first, in the compute dtype (fp32, fp64 for fp64 signals): O(window) loads
#                  per position (cached), so a NaN or inf affects exactly the windows that contain it, which a
#                  difference of running sums would not guarantee.
#   first[b]     = min over tiles of the smallest t < n with mean[b, t] > threshold, else n.
@triton.jit
def _prefix_scan_kernel(
    signal_ptr,  # [B, L] float signal (fp32 / bf16 / fp16 / fp64), strides s_signal_b, s_signal_l
    lengths_ptr,  # [B] int64 valid length of each sequence, in [0, L]
    cumsum_ptr,  # [B, L] out, contiguous, signal dtype: inclusive running sums, 0 beyond the length
    first_ptr,  # [B] int64 out: the first position whose trailing mean exceeds the threshold, else the length
    L,  # positions per sequence
    s_signal_b, s_signal_l,
    window,  # trailing window size, >= 1
    threshold_hi, threshold_lo,  # the threshold as two fp32 halves
    FP64: tl.constexpr,  # compute in fp64 (float64 signal); else fp32
    BLOCK_L: tl.constexpr,  # positions per tile
):
    dt = tl.float64 if FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    row = signal_ptr + b * s_signal_b
    out_row = cumsum_ptr + b * L
    n = tl.load(lengths_ptr + b)
    valid = tl.minimum(n, L)  # a length beyond L (unchecked on GPU) must not read past the row
    threshold = hyper(threshold_hi, threshold_lo, FP64)
    offsets = tl.arange(0, BLOCK_L).to(tl.int64)
    carry = tl.zeros((), tl.float64)
    first = n
    for start in range(0, L, BLOCK_L):
        t = start + offsets
        inside = t < valid
        x = tl.load(row + t * s_signal_l, mask=inside, other=0.0).to(dt)
        running = tl.cumsum(x.to(tl.float64), 0) + carry
        # rounded as torch rounds its cumsum: to the compute dtype, then to the signal dtype
        out = cast_for_store(tl.where(inside, running, 0.0).to(dt), cumsum_ptr)
        tl.store(out_row + t, out, mask=t < L)
        carry = tl.sum(tl.where(t == start + BLOCK_L - 1, running, 0.0), 0)

        window_sum = tl.zeros((BLOCK_L,), dt)
        for k in range(0, window):
            u = t - window + 1 + k
            window_sum += tl.load(row + u * s_signal_l, mask=inside & (u >= 0), other=0.0).to(dt)
        mean = window_sum / tl.minimum(t + 1, window).to(dt)
        hit = inside & (mean > threshold)
        first = tl.minimum(first, tl.min(tl.where(hit, t, n), 0))
    tl.store(first_ptr + b, first)


# One fixed tile (the work is O(B L window), small next to the vocabulary sweeps): nothing to tune.
prefix_scan_kernel = triton.autotune(configs=[scan_tile().config("BLOCK_L")], key=[])(_prefix_scan_kernel)


def segmented_scan(signal, lengths, cumsum, first, threshold: float, window: int) -> None:
    """Launch over signal [B, L] (any strides) and lengths [B] int64 contiguous into cumsum [B, L] (signal
    dtype, contiguous) and first [B] int64. One program per sequence."""
    batch, length = signal.shape
    if batch == 0:
        return
    threshold_hi, threshold_lo = split(threshold)
    wrap_triton(prefix_scan_kernel)[(batch,)](
        signal_ptr=signal, lengths_ptr=lengths, cumsum_ptr=cumsum, first_ptr=first, L=length,
        s_signal_b=signal.stride(0), s_signal_l=signal.stride(1), window=window,
        threshold_hi=threshold_hi, threshold_lo=threshold_lo, FP64=signal.dtype == torch.float64)
