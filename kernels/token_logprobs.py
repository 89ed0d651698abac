"""Log-probability of one token per row, log softmax(logits / T)[id], and its gradient sweep.

Rows r = b * L + l of logits [B, L, V] with arbitrary strides; a = x / T, lse = logsumexp(a). The ignore id
IGNORE_INDEX (-100) gives 0 and a zero gradient row.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from trd_fast import constants
from trd_fast.kernels.common import (cast_for_store, hyper, online_logsumexp, row_offset, save_stat, shift_of,
                                     split, split_stat)
from trd_fast.kernels.configs import STREAM_PRUNE, stream_configs

IGNORE_INDEX = tl.constexpr(constants.IGNORE_INDEX)


# Id check: every id is in [0, V) or -100. A separate, tiny kernel compiled with debug=True so that its
# tl.device_assert is live on GPU without turning on Triton's debug mode (integer overflow checks on every
# add) in the streaming kernel. The streaming kernel gives NaN for a bad id wherever asserts are compiled out
# (torch.compile's copy of a user kernel drops debug=True).
@triton.jit(debug=True)
def _check_token_ids_kernel(
    ids_ptr,  # [N] int64 token ids
    N,  # number of ids
    V,  # vocabulary size
    BLOCK: tl.constexpr,  # ids per program
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    mask = idx < N
    ids = tl.load(ids_ptr + idx, mask=mask, other=0)
    ok = ((ids >= 0) & (ids < V)) | (ids == IGNORE_INDEX)
    tl.device_assert(ok | (idx >= N), "token_ids: an id outside [0, V) other than the ignore index -100")


# Forward, one streaming pass: lse = c + log S with the online (shift c of the running max, rescaled sum S)
# pair over the row's tiles, and the picked logit read directly at its id, so logprob = a[id] - lse (0 for
# id == -100). lse is saved in fp64 for the backward sweep.
@triton.jit
def _token_logprobs_kernel(
    logits_ptr,  # [B, L, V] logits (fp32 / bf16 / fp16 / fp64), strides s_logits_*
    ids_ptr,  # [B * L] int64 token ids (-100 = ignore)
    logprobs_ptr,  # [B * L] fp32 out: log p[id], 0 for ignored rows
    lse_ptr,  # [B * L] fp64 out: logsumexp(logits / T) of each row
    L,  # positions per sequence: row r = b * L + l
    s_logits_b, s_logits_l, s_logits_v,
    V,  # vocabulary size
    inv_temperature_hi, inv_temperature_lo,  # 1 / T as two fp32 halves
    FP64: tl.constexpr,  # compute in fp64 (float64 logits); else fp32
    BLOCK_V: tl.constexpr,  # columns per tile
):
    dt = tl.float64 if FP64 else tl.float32
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + row_offset(r, L, s_logits_b, s_logits_l)
    inv_t = hyper(inv_temperature_hi, inv_temperature_lo, FP64)
    offsets = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), dt)
    s = tl.zeros((), tl.float64)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(row + cols * s_logits_v, mask=cols < V, other=float("-inf")).to(dt)
        m, s, _, _, _ = online_logsumexp(x, inv_t, m, s)
    shift = shift_of(m, inv_t)
    log_s = tl.log(s)

    token = tl.load(ids_ptr + r)
    valid = (token >= 0) & (token < V)
    picked = tl.load(row + tl.where(valid, token, 0) * s_logits_v).to(dt)
    # (a[id] - c) - log S rather than a[id] - lse: no rounding of |lse| * eps in the result
    picked_logprob = tl.fma(picked, inv_t, -shift).to(tl.float64) - log_s
    logprob = tl.where(token == IGNORE_INDEX, 0.0, tl.where(valid, picked_logprob, float("nan")))
    tl.store(logprobs_ptr + r, logprob.to(tl.float32))
    tl.store(lse_ptr + r, save_stat(shift, log_s))


# Backward: d log p[id] / d a_j = 1[j == id] - p_j with p_j = exp(fma(x_j, 1 / T, -lse_hi)) exp(-lse_lo) (see
# `split_stat`), and a = x / T, so row r with upstream gradient g gets (g / T) (1[j == id] - p_j); the row is 0
# (and nothing is read) if id == -100 or g == 0. One sweep, written once.
@triton.jit
def _token_logprobs_backward_kernel(
    grad_ptr,  # [B * L] fp32 upstream gradient g of each row's log-prob
    logits_ptr,  # [B, L, V] logits, strides s_logits_*
    ids_ptr,  # [B * L] int64 token ids (-100 = ignore)
    lse_ptr,  # [B * L] fp64 forward logsumexp(logits / T)
    out_ptr,  # [B, L, V] gradient out (logits dtype), strides s_out_*
    L,  # positions per sequence: row r = b * L + l
    s_logits_b, s_logits_l, s_logits_v,
    s_out_b, s_out_l, s_out_v,
    V,  # vocabulary size
    inv_temperature_hi, inv_temperature_lo,  # 1 / T as two fp32 halves
    FP64: tl.constexpr,  # compute in fp64 (float64 logits); else fp32
    BLOCK_V: tl.constexpr,  # columns per tile
):
    dt = tl.float64 if FP64 else tl.float32
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + row_offset(r, L, s_logits_b, s_logits_l)
    out_row = out_ptr + row_offset(r, L, s_out_b, s_out_l)
    inv_t = hyper(inv_temperature_hi, inv_temperature_lo, FP64)
    g = tl.load(grad_ptr + r).to(dt)
    token = tl.load(ids_ptr + r)
    lse_hi, _, exp_neg_lo = split_stat(tl.load(lse_ptr + r), FP64)
    scale = g * inv_t
    live = (token != IGNORE_INDEX) & (g != 0.0)
    live_columns = tl.where(live, V, 0)  # columns to read: V, or none
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        inside = cols < V
        x = tl.load(row + cols * s_logits_v, mask=cols < live_columns, other=float("-inf")).to(dt)
        p = tl.exp(tl.fma(x, inv_t, -lse_hi)) * exp_neg_lo
        grad = tl.where(live, scale * (tl.where(cols == token, 1.0, 0.0) - p), 0.0)
        tl.store(out_row + cols * s_out_v, cast_for_store(grad, out_ptr), mask=inside)


token_logprobs_kernel = triton.autotune(configs=stream_configs(), prune_configs_by=STREAM_PRUNE, key=["V"])(
    _token_logprobs_kernel)
token_logprobs_backward_kernel = triton.autotune(configs=stream_configs(), prune_configs_by=STREAM_PRUNE, key=["V"])(
    _token_logprobs_backward_kernel)
CHECK_BLOCK = 1024


def check_token_ids(token_ids, vocab: int) -> None:
    """Device-side assert that token_ids (contiguous int64) are in [0, vocab) or -100 (live on GPU)."""
    n = token_ids.numel()
    if n == 0:
        return
    wrap_triton(_check_token_ids_kernel)[(triton.cdiv(n, CHECK_BLOCK),)](
        ids_ptr=token_ids, N=n, V=vocab, BLOCK=CHECK_BLOCK)


def token_logprobs_forward(logits, token_ids, logprobs, lse, temperature: float) -> None:
    """Launch over logits [B, L, V] (any strides), token_ids [B, L] int64 contiguous, into logprobs [B, L]
    fp32 and lse [B, L] (contiguous). One program per row."""
    batch, length, vocab = logits.shape
    rows = batch * length
    if rows == 0:
        return
    inv_t_hi, inv_t_lo = split(1.0 / temperature)
    wrap_triton(token_logprobs_kernel)[(rows,)](
        logits_ptr=logits, ids_ptr=token_ids, logprobs_ptr=logprobs, lse_ptr=lse, L=length,
        s_logits_b=logits.stride(0), s_logits_l=logits.stride(1), s_logits_v=logits.stride(2), V=vocab,
        inv_temperature_hi=inv_t_hi, inv_temperature_lo=inv_t_lo, FP64=logits.dtype == torch.float64)


def token_logprobs_backward(grad, logits, token_ids, lse, out, temperature: float) -> None:
    """Launch the gradient sweep into out [B, L, V] (logits dtype). grad, token_ids, lse [B, L] contiguous."""
    batch, length, vocab = logits.shape
    rows = batch * length
    if rows == 0:
        return
    inv_t_hi, inv_t_lo = split(1.0 / temperature)
    wrap_triton(token_logprobs_backward_kernel)[(rows,)](
        grad_ptr=grad, logits_ptr=logits, ids_ptr=token_ids, lse_ptr=lse, out_ptr=out, L=length,
        s_logits_b=logits.stride(0), s_logits_l=logits.stride(1), s_logits_v=logits.stride(2),
        s_out_b=out.stride(0), s_out_l=out.stride(1), s_out_v=out.stride(2), V=vocab,
        inv_temperature_hi=inv_t_hi, inv_temperature_lo=inv_t_lo, FP64=logits.dtype == torch.float64)
