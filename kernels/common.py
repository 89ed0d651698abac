"""@triton.jit helpers shared by the row-streaming kernels.

Conventions of every kernel in this package:
- One program per row r = b * L + l of a [B, L, V] tensor with arbitrary strides: the row starts at
  b * stride_b + l * stride_l (computed in int64 from tl.program_id(0).to(tl.int64)); columns are at
  j * stride_v (Triton specializes stride_v == 1, so the usual unit stride costs nothing).
- Every load is cast to the compute dtype at once: fp32, or fp64 when FP64 (float64 inputs).
- Float hyper-parameters are runtime arguments passed as two fp32 halves, hi = fp32(x) and lo = fp32(x - hi)
  (a float kernel argument is fp32): hi + lo in fp64 carries ~48 bits of x, hi alone is x in fp32.
- Logits are scaled by u = 1 / T only inside an fma with a row shift, z = u x - c (`online_logsumexp`), so that
  u x is never rounded on its own. A row's running sums are fp64 scalars (one fp64 add per tile): kept in fp32,
  their rescalings and tile additions alone cost a few ulp of S, and so of every p.
- Row log-normalisers c + log S saved for a backward sweep are fp64 (exact for fp32 parts) and split as
  lse = hi + lo (`split_stat`): with z = fma(x, u, -hi), log p = z - lo is rounded relative to |log p| and not
  to |lse| (an fp32 lse near 1e4 is off by up to 5e-4), and p = exp(z) exp(-lo) carries no rounding of log p
  either (that of |log p| ~ 10 would be ~4 ulp of p).
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
def shift_of(m, inv_t):
    """The shift c = u m (u = inv_t) of a running max m of raw logits, or 0 while m is -inf (so that the
    exponent of a -inf logit is -inf - 0, not -inf + inf)."""
    return tl.where(m == float("-inf"), 0.0, m * inv_t)


@triton.jit
def online_logsumexp(x, inv_t, m, s):
    """One tile of a streaming log-sum-exp of u x over raw logits x (u = inv_t): the running max m of x and the
    running sum s = sum exp(u x_seen - c) (fp64), c = `shift_of(m)`.

    With m' = max(m, max x) and c' its shift: s' = s exp(c - c') + sum exp(z), where z = u x - c' is formed by
    one fma (rounded once, relative to |z|: u x itself is never rounded). Masked columns are -inf. A NaN in x
    reaches s through exp(NaN) = NaN. Returns (m', s', z, exp(z), exp(c - c')): the exponents of the tile in the
    new frame, their exps and the factor that rescales sums kept in the old frame (0 while m was -inf).
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = shift_of(m_new, inv_t)
    alpha = tl.exp((m * inv_t - shift).to(tl.float64))
    z = tl.fma(x, inv_t, -shift)
    e = tl.exp(z)
    return m_new, s * alpha + tl.sum(e, 0).to(tl.float64), z, e, alpha


@triton.jit
def exponent_and_log_prob(x, inv_t, hi, lo):
    """For raw logits x of a row whose log-normaliser is hi + lo: z = u x - hi (one fma) and log p = z - lo."""
    z = tl.fma(x, inv_t, -hi)
    return z, z - lo


@triton.jit
def save_stat(shift, log_s):
    """A log-normaliser c + log S as the fp64 row statistic (exact for fp32 c and log S)."""
    return shift.to(tl.float64) + log_s.to(tl.float64)


@triton.jit
def split_stat(stat, FP64: tl.constexpr):
    """A saved fp64 row statistic as (hi, lo, exp(-lo)) in the compute dtype, hi + lo = stat (lo = 0 in fp64)."""
    dt = tl.float64 if FP64 else tl.float32
    hi = stat.to(dt)
    lo = tl.where(stat == hi.to(tl.float64), 0.0, stat - hi.to(tl.float64))
    return hi, lo.to(dt), tl.exp(-lo).to(dt)


@triton.jit
def rescale(acc, alpha):
    """acc * alpha for a weighted-sum accumulator, 0 when alpha underflowed to 0 (so inf * 0 is never NaN).

    A NaN row stays NaN through its running sum s, which is rescaled by plain multiplication.
    """
    return tl.where(alpha == 0.0, 0.0, acc * alpha)


@triton.jit
def log_mixture(lp, lq, log_1m_beta, log_beta):
    """log M = log((1 - beta) p + beta q) = logaddexp(lp + log(1 - beta), lq + log beta), -inf if p = q = 0.

    log(1 + y) rounds 1 + y first: up to ulp(1) / 2 absolute in log M, the error of the log of the mixed
    probabilities themselves (the C++ kernels' form). A first-order correction of that rounding cut the RMS
    error by 5-20% in the jsd tests' regimes and made the fp64 jsd kernels spill registers on sm_90."""
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
