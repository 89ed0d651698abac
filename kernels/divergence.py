"""Fused student/teacher divergence over rows of logits: forward (value + row statistics) and gradient sweep.

Row r of student [B, L, Vs] and teacher [Bt, Lt, Vt] is at b * L + l on each side, with each side's own
split (B L = Bt Lt rows); only the common columns j < Vc = min(Vs, Vt) count. With temperature T: a = s / T,
b = t / T (computed as s * (1 / T)), p = softmax(a), q = softmax(b), A = logsumexp(a), Bq = logsumexp(b), so
log p = a - A and log q = b - Bq. Kinds (the `kind` argument of the ops, codes in trd_fast/constants.py):
  FORWARD_KL  l = sum q (log q - log p)
  REVERSE_KL  l = sum p (log p - log q)
  JSD         M = (1 - beta) p + beta q, l = beta KL(q || M) + (1 - beta) KL(p || M), 0 < beta < 1
Row statistics saved for the backward sweep: stats = (A, Bq, K), K = l (reverse_kl), KL(p || M) (jsd), 0.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from trd_fast import constants
from trd_fast.kernels.common import (cast_for_store, hyper, log_mixture, online_logsumexp, rescale, row_offset,
                                     split, xlogratio)
from trd_fast.kernels.configs import STREAM_PRUNE, stream_configs

FORWARD_KL = tl.constexpr(constants.FORWARD_KL)
REVERSE_KL = tl.constexpr(constants.REVERSE_KL)
JSD = tl.constexpr(constants.JSD)

# Forward. forward_kl in one streaming pass: log q - log p = (b - a) - B + A, so
#   l = sum_j q_j (b_j - a_j) + A - Bq = W_b / S_b + A - Bq,
#   S_b = sum_j exp(b_j - m_b), W_b = sum_j exp(b_j - m_b) (b_j - a_j)  (m_b: running max of b).
# Each tile raises m_b to m_b' and rescales S_b and W_b by exp(m_b - m_b') (online softmax); A and Bq come from
# the running (max, sum) pairs as m + log S. reverse_kl is the mirror image: l = W_a / S_a - A + Bq with
# W_a = sum_j exp(a_j - m_a) (a_j - b_j). Terms with q_j = 0 (b_j = -inf) are exactly 0 (0 log 0 = 0); a
# q_j > 0 against a_j = -inf makes W_b = +inf and l = +inf (truly infinite), never NaN. A NaN logit makes
# S (and so l) NaN. An all -inf row gives 0 / 0 = NaN.
# jsd needs log M = log((1 - beta) p + beta q) with both final normalizers, hence a second sweep:
#   KL(q || M) = sum q (log q - log M), KL(p || M) = sum p (log p - log M), log M by logaddexp.
@triton.jit
def _divergence_forward_kernel(
    student_ptr,  # [B, L, Vs] student logits (fp32 / bf16 / fp16 / fp64), strides s_student_*
    teacher_ptr,  # [Bt, Lt, Vt] teacher logits, any of the same dtypes, strides s_teacher_*
    value_ptr,  # [B * L] fp32 out: the divergence l of each row
    stats_ptr,  # [B * L, 3] out (fp32, fp64 for fp64 students): A, Bq, K of each row
    L_student,  # the student's positions per sequence: its row r = b * L_student + l
    L_teacher,  # the teacher's: its row r = b * L_teacher + l
    s_student_b, s_student_l, s_student_v,
    s_teacher_b, s_teacher_l, s_teacher_v,
    V_common,  # Vc = min(Vs, Vt): the columns that count
    inv_temperature_hi, inv_temperature_lo,  # 1 / T as two fp32 halves
    beta_hi, beta_lo,  # jsd's beta as two fp32 halves (unused by the KL kinds)
    KIND: tl.constexpr,  # FORWARD_KL, REVERSE_KL or JSD
    FP64: tl.constexpr,  # compute in fp64 (float64 inputs); else fp32
    BLOCK_V: tl.constexpr,  # columns per tile
):
    dt = tl.float64 if FP64 else tl.float32
    r = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row_offset(r, L_student, s_student_b, s_student_l)
    teacher_row = teacher_ptr + row_offset(r, L_teacher, s_teacher_b, s_teacher_l)
    inv_t = hyper(inv_temperature_hi, inv_temperature_lo, FP64)
    offsets = tl.arange(0, BLOCK_V)

    m_a = tl.full((), float("-inf"), dt)
    s_a = tl.zeros((), dt)
    m_b = tl.full((), float("-inf"), dt)
    s_b = tl.zeros((), dt)
    w = tl.zeros((), dt)  # W_b (forward_kl) or W_a (reverse_kl)
    for start in range(0, V_common, BLOCK_V):
        cols = start + offsets
        mask = cols < V_common
        a = tl.load(student_row + cols * s_student_v, mask=mask, other=float("-inf")).to(dt) * inv_t
        b = tl.load(teacher_row + cols * s_teacher_v, mask=mask, other=float("-inf")).to(dt) * inv_t
        m_a, s_a, e_a, alpha_a = online_logsumexp(a, m_a, s_a)
        m_b, s_b, e_b, alpha_b = online_logsumexp(b, m_b, s_b)
        if KIND == FORWARD_KL:
            w = rescale(w, alpha_b) + tl.sum(xlogratio(e_b, b - a), 0)
        elif KIND == REVERSE_KL:
            w = rescale(w, alpha_a) + tl.sum(xlogratio(e_a, a - b), 0)
    # A = m_a + log S_a is stored rounded to the stats dtype; within this kernel the two parts stay separate
    # (a - A = (a - m_a) - log S_a), so the value and K carry no rounding error of |A| * eps.
    log_s_a = tl.log(s_a)
    log_s_b = tl.log(s_b)
    lse_a = m_a + log_s_a
    lse_b = m_b + log_s_b
    lse_diff = (m_a - m_b) + (log_s_a - log_s_b)  # A - Bq

    if KIND == FORWARD_KL:
        value = w / s_b + lse_diff
        k = tl.zeros((), dt)
    elif KIND == REVERSE_KL:
        value = w / s_a - lse_diff
        k = value
    else:
        beta = hyper(beta_hi, beta_lo, FP64)
        log_beta = tl.log(beta)
        log_1m_beta = tl.log(1.0 - beta)
        kl_q = tl.zeros((), dt)  # KL(q || M)
        kl_p = tl.zeros((), dt)  # KL(p || M)
        for start in range(0, V_common, BLOCK_V):
            cols = start + offsets
            mask = cols < V_common
            a = tl.load(student_row + cols * s_student_v, mask=mask, other=float("-inf")).to(dt) * inv_t
            b = tl.load(teacher_row + cols * s_teacher_v, mask=mask, other=float("-inf")).to(dt) * inv_t
            log_p = (a - m_a) - log_s_a
            log_q = (b - m_b) - log_s_b
            log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
            kl_q += tl.sum(xlogratio(tl.exp(log_q), log_q - log_m), 0)
            kl_p += tl.sum(xlogratio(tl.exp(log_p), log_p - log_m), 0)
        value = beta * kl_q + (1.0 - beta) * kl_p
        k = kl_p

    tl.store(value_ptr + r, value.to(tl.float32))
    stats_dtype = stats_ptr.dtype.element_ty
    tl.store(stats_ptr + 3 * r, lse_a.to(stats_dtype))
    tl.store(stats_ptr + 3 * r + 1, lse_b.to(stats_dtype))
    tl.store(stats_ptr + 3 * r + 2, k.to(stats_dtype))


# Backward. With a = s / T, dl/ds_j = (1 / T) dl/da_j and, for j < Vc,
#   forward_kl  dl/da_j = p_j - q_j
#   reverse_kl  dl/da_j = p_j (log p_j - log q_j - l)                     (0 where p_j = 0)
#   jsd         dl/da_j = (1 - beta) p_j (log p_j - log M_j - KL(p || M))  (0 where p_j = 0)
# (for reverse_kl: d/da_j sum_i p_i x_i with x_i = log p_i - log q_i gives p_j x_j - p_j sum_i p_i x_i; jsd
# likewise, the q terms of KL(q || M) and the p terms of KL(p || M) contributing p_j (log p_j - log M_j) in
# total), recomputed in one sweep from the saved (A, Bq, K). Row r with upstream gradient g: the gradient is
# (g / T) dl/da on common columns and 0 on columns Vc <= j < Vs; the whole row is 0 if g == 0 or l = +-inf
# (no loads then); NaN on the common columns if l is NaN.
@triton.jit
def _divergence_backward_kernel(
    grad_ptr,  # [B * L] fp32 upstream gradient g of each row's value
    student_ptr,  # [B, L, Vs] student logits, strides s_student_*
    teacher_ptr,  # [Bt, Lt, Vt] teacher logits, strides s_teacher_*
    value_ptr,  # [B * L] fp32 forward values l
    stats_ptr,  # [B * L, 3] forward statistics A, Bq, K
    out_ptr,  # [B, L, Vs] gradient out (student dtype), strides s_out_*: a new tensor, or student itself
    L_student,  # the student's (and out's) positions per sequence: row r = b * L_student + l
    L_teacher,  # the teacher's: its row r = b * L_teacher + l
    s_student_b, s_student_l, s_student_v,
    s_teacher_b, s_teacher_l, s_teacher_v,
    s_out_b, s_out_l, s_out_v,
    V_student,  # Vs: columns written
    V_common,  # Vc = min(Vs, Vt): columns with a nonzero gradient
    inv_temperature_hi, inv_temperature_lo,  # 1 / T as two fp32 halves
    beta_hi, beta_lo,  # jsd's beta as two fp32 halves
    KIND: tl.constexpr,  # FORWARD_KL, REVERSE_KL or JSD
    FP64: tl.constexpr,  # compute in fp64 (float64 inputs); else fp32
    BLOCK_V: tl.constexpr,  # columns per tile
):
    dt = tl.float64 if FP64 else tl.float32
    r = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row_offset(r, L_student, s_student_b, s_student_l)
    teacher_row = teacher_ptr + row_offset(r, L_teacher, s_teacher_b, s_teacher_l)
    out_row = out_ptr + row_offset(r, L_student, s_out_b, s_out_l)
    inv_t = hyper(inv_temperature_hi, inv_temperature_lo, FP64)
    if KIND == JSD:
        beta = hyper(beta_hi, beta_lo, FP64)
        log_beta = tl.log(beta)
        log_1m_beta = tl.log(1.0 - beta)

    g = tl.load(grad_ptr + r).to(dt)
    value = tl.load(value_ptr + r).to(dt)
    lse_a = tl.load(stats_ptr + 3 * r).to(dt)
    lse_b = tl.load(stats_ptr + 3 * r + 1).to(dt)
    k = tl.load(stats_ptr + 3 * r + 2).to(dt)
    scale = g * inv_t
    live = (g != 0.0) & (value != float("inf")) & (value != float("-inf"))
    nan_row = value != value
    live_columns = tl.where(live, V_common, 0)  # columns to read and differentiate: Vc, or none
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V_student, BLOCK_V):
        cols = start + offsets
        common = cols < live_columns
        a = tl.load(student_row + cols * s_student_v, mask=common, other=float("-inf")).to(dt) * inv_t
        b = tl.load(teacher_row + cols * s_teacher_v, mask=common, other=float("-inf")).to(dt) * inv_t
        log_p = a - lse_a
        p = tl.exp(log_p)
        if KIND == FORWARD_KL:
            d = p - tl.exp(b - lse_b)
        elif KIND == REVERSE_KL:
            d = xlogratio(p, log_p - (b - lse_b) - k)
        else:
            log_m = log_mixture(log_p, b - lse_b, log_1m_beta, log_beta)
            d = (1.0 - beta) * xlogratio(p, log_p - log_m - k)
        grad = tl.where(common, tl.where(nan_row, float("nan"), d * scale), 0.0)
        tl.store(out_row + cols * s_out_v, cast_for_store(grad, out_ptr), mask=cols < V_student)


divergence_forward_kernel = triton.autotune(
    configs=stream_configs(), prune_configs_by=STREAM_PRUNE, key=["V_common", "KIND"])(_divergence_forward_kernel)
divergence_backward_kernel = triton.autotune(
    configs=stream_configs(), prune_configs_by=STREAM_PRUNE, key=["V_student", "V_common", "KIND"])(
    _divergence_backward_kernel)
# In place the kernel overwrites the student logits it reads: benchmarking must restore them between configs.
divergence_backward_inplace_kernel = triton.autotune(
    configs=stream_configs(), prune_configs_by=STREAM_PRUNE, key=["V_student", "V_common", "KIND"],
    restore_value=["student_ptr"])(
    _divergence_backward_kernel)


def divergence_forward(student, teacher, value, stats, kind: int, beta: float, temperature: float) -> None:
    """Launch the forward over student [B, L, Vs] and teacher [Bt, Lt, Vt] (any strides, Bt Lt = B L rows) into
    value [B, L] fp32 and stats [B, L, 3] (both contiguous). One program per row; none for B * L == 0."""
    batch, length, v_student = student.shape
    rows = batch * length
    if rows == 0:
        return
    fp64 = torch.float64 in (student.dtype, teacher.dtype)
    inv_t_hi, inv_t_lo = split(1.0 / temperature)
    beta_hi, beta_lo = split(beta)
    wrap_triton(divergence_forward_kernel)[(rows,)](
        student_ptr=student, teacher_ptr=teacher, value_ptr=value, stats_ptr=stats, L_student=length,
        L_teacher=teacher.shape[1],
        s_student_b=student.stride(0), s_student_l=student.stride(1), s_student_v=student.stride(2),
        s_teacher_b=teacher.stride(0), s_teacher_l=teacher.stride(1), s_teacher_v=teacher.stride(2),
        V_common=min(v_student, teacher.shape[2]), inv_temperature_hi=inv_t_hi, inv_temperature_lo=inv_t_lo,
        beta_hi=beta_hi, beta_lo=beta_lo, KIND=kind, FP64=fp64)


def divergence_backward(grad_value, student, teacher, value, stats, out, kind: int, beta: float,
                        temperature: float) -> None:
    """Launch the gradient sweep into out [B, L, Vs] (student dtype, any strides; `out is student` for the
    in-place variant). grad_value and value [B, L] fp32, stats [B, L, 3], all contiguous."""
    batch, length, v_student = student.shape
    rows = batch * length
    if rows == 0 or v_student == 0:
        return
    fp64 = torch.float64 in (student.dtype, teacher.dtype)
    inv_t_hi, inv_t_lo = split(1.0 / temperature)
    beta_hi, beta_lo = split(beta)
    kernel = divergence_backward_inplace_kernel if out is student else divergence_backward_kernel
    wrap_triton(kernel)[(rows,)](
        grad_ptr=grad_value, student_ptr=student, teacher_ptr=teacher, value_ptr=value, stats_ptr=stats,
        out_ptr=out, L_student=length, L_teacher=teacher.shape[1],
        s_student_b=student.stride(0), s_student_l=student.stride(1), s_student_v=student.stride(2),
        s_teacher_b=teacher.stride(0), s_teacher_l=teacher.stride(1), s_teacher_v=teacher.stride(2),
        s_out_b=out.stride(0), s_out_l=out.stride(1), s_out_v=out.stride(2),
        V_student=v_student, V_common=min(v_student, teacher.shape[2]),
        inv_temperature_hi=inv_t_hi, inv_temperature_lo=inv_t_lo, beta_hi=beta_hi, beta_lo=beta_lo,
        KIND=kind, FP64=fp64)
