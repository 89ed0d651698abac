"""@triton.jit helpers shared by the row-streaming kernels.

Conventions of every kernel in this package:
- One program per row r = b * L + l of a [B, L, V] tensor with arbitrary strides: the row starts at
  b * stride_b + l * stride_l (computed in int64 from tl.program_id(0).to(tl.int64)); columns are at
  j * stride_v (Triton specializes stride_v == 1, so the usual unit stride costs nothing).
- Every load is cast to the compute dtype at once: fp32, or fp64 when FP64 (float64 inputs).
- Float hyper-parameters are runtime arguments passed as two fp32 halves, hi = fp32(x) and lo = fp32(x - hi)
  (a float kernel argument is fp32): hi + lo in fp64 carries ~48 bits of x, hi alone is x in fp32.
"""

import numpy as np
import triton
import triton.language as tl

from trd_fast.kernels.configs import INTERPRETED

# The interpreter's fp32 -> bf16 cast truncates; a compiled kernel's rounds to nearest even. Under the
# interpreter bf16 outputs are rounded by hand so both give the same bits (dead code when compiled).
ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def hyper(hi, lo, FP64: tl.constexpr):
    """A runtime float hyper-parameter, in the compute dtype (see the module docstring)."""
    dt = tl.float64 if FP64 else tl.float32
    return (tl.zeros((), dt) + hi) + lo


@triton.jit
def cast_for_store(x, ptr):
    """x (fp32 / fp64) in the element dtype of ptr, rounded to nearest even."""
    dtype = ptr.dtype.element_ty
    if ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even on the dropped 16 bits
            y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.float32).to(tl.bfloat16), y)
    return x.to(dtype)


@triton.jit
def row_offset(r, L, stride_b, stride_l):
    """Element offset of row r = b * L + l (r is int64, so the products cannot overflow)."""
    return (r // L) * stride_b + (r % L) * stride_l


@triton.jit
def online_logsumexp(x, m, s):
    """One tile of a streaming log-sum-exp: running max m and running sum s = sum exp(x_seen - m).

    With m' = max(m, max x): s' = s exp(m - m') + sum exp(x - m'). Masked columns are -inf. While every
    value seen is -inf, m' = -inf and we shift by 0 instead (exp(-inf - 0) = 0 rather than exp(NaN)).
    A NaN in x reaches s through exp(NaN) = NaN. Returns (m', s', exp(x - m'), exp(m - m')); the last two let
    callers rescale their own accumulators the same way.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    e = tl.exp(x - shift)
    return m_new, s * alpha + tl.sum(e, 0), e, alpha


@triton.jit
def rescale(acc, alpha):
    """acc * alpha for a weighted-sum accumulator, 0 when alpha underflowed to 0 (so inf * 0 is never NaN).

    A NaN row stays NaN through its running sum s, which is rescaled by plain multiplication.
    """
    return tl.where(alpha == 0.0, 0.0, acc * alpha)


@triton.jit
def log_mixture(lp, lq, log_1m_beta, log_beta):
    """log M = log((1 - beta) p + beta q) = logaddexp(lp + log(1 - beta), lq + log beta), -inf if p = q = 0."""
    x = lp + log_1m_beta
    y = lq + log_beta
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe)))


@triton.jit
def xlogratio(x, log_ratio):
    """x * log_ratio with 0 log 0 = 0: exactly 0 where x == 0 (NaN != 0, so NaN stays NaN)."""
    return tl.where(x == 0.0, 0.0, x * log_ratio)


def split(x: float) -> tuple[float, float]:
    """Host side: x as (hi, lo) fp32 halves for a kernel's float arguments (see the module docstring)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))
