"""Fused student/teacher divergence over rows of logits: forward (value + row statistics) and gradient sweep.

Row r of student [B, L, Vs] and teacher [Bt, Lt, Vt] is at b * L + l on each side, with each side's own
split (B L = Bt Lt rows); only the common columns j < Vc = min(Vs, Vt) count. With temperature T: a = s / T,
b = t / T (computed as s * (1 / T)), p = softmax(a), q = softmax(b), A = logsumexp(a), Bq = logsumexp(b), so
log p = a - A and log q = b - Bq. Kinds (the `kind` argument of the ops, codes in trd_fast/constants.py):
  FORWARD_KL  l = sum q (log q - log p)
  REVERSE_KL  l = sum p (log p - log q)
  JSD         M = (1 - beta) p + beta q, l = beta KL(q || M) + (1 - beta) KL(p || M), 0 < beta < 1
Row statistics saved for the backward sweep, fp64 whatever the logits: stats = (A, Bq, K), K = l (reverse_kl),
KL(p || M) (jsd), 0.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from trd_fast import constants
from trd_fast.kernels.common import (cast_for_store, exponent_and_log_prob, hyper, log_mixture, online_logsumexp,
                                     rescale, row_offset, save_stat, shift_of, split, split_stat, xlogratio)
from trd_fast.kernels.configs import STREAM_PRUNE, stream_configs

FORWARD_KL = tl.constexpr(constants.FORWARD_KL)
REVERSE_KL = tl.constexpr(constants.REVERSE_KL)
JSD = tl.constexpr(constants.JSD)


# Forward. forward_kl in one streaming pass, each logit in its own row's frame: z_a = a - c_a with c_a the
# shift of the student row's running max (`online_logsumexp`), S_a = sum_j exp(z_a,j), and z_b, c_b, S_b for
# the teacher. log q - log p = (z_b - z_a) - log S_b + log S_a, so
#   l = W_b / S_b + log S_a - log S_b,   W_b = sum_j exp(z_b,j) (z_b,j - z_a,j),
# and no quantity as large as the logits is ever subtracted (a teacher row peaked at 1e4 costs no digits).
# Each tile raises c_a by d_a and c_b by d_b (online softmax): S_b and W_b are rescaled by exp(-d_b), and every
# term of W_b moves by d_a - d_b, so W_b <- exp(-d_b) (W_b + (d_a - d_b) S_b) with S_b before the tile. A and
# Bq are saved as c + log S. reverse_kl is the mirror image:
# l = W_a / S_a + log S_b - log S_a with W_a = sum_j exp(z_a,j) (z_a,j - z_b,j). Terms with
# q_j = 0 (b_j = -inf) are exactly 0 (0 log 0 = 0); a q_j > 0 against a_j = -inf makes W_b = +inf and
# l = +inf (truly infinite), never NaN. A NaN logit makes S (and so l) NaN. An all -inf row gives 0 / 0 = NaN.
# jsd needs log M = log((1 - beta) p + beta q) with both final normalizers, hence a second sweep:
#   KL(q || M) = sum q (log q - log M), KL(p || M) = sum p (log p - log M), log M by logaddexp, with
# log p = (u s - c_a) - log S_a and p = exp(log p) (exp(z) / S_a would save the rounding of log p, a few ulp of
# p, at registers that the fp64 variant does not have on sm_90).
@triton.jit
def _divergence_forward_kernel(
    student_ptr,  # [B, L, Vs] student logits (fp32 / bf16 / fp16 / fp64), strides s_student_*
    teacher_ptr,  # [Bt, Lt, Vt] teacher logits, any of the same dtypes, strides s_teacher_*
    value_ptr,  # [B * L] fp32 out: the divergence l of each row
    stats_ptr,  # [B * L, 3] fp64 out: A, Bq, K of each row
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

    m_a = tl.full((), float("-inf"), dt)  # running max of the raw student logits
    s_a = tl.zeros((), tl.float64)
    m_b = tl.full((), float("-inf"), dt)  # and of the teacher's
    s_b = tl.zeros((), tl.float64)
    w = tl.zeros((), tl.float64)  # W_b (forward_kl) or W_a (reverse_kl)
    for start in range(0, V_common, BLOCK_V):
        cols = start + offsets
        mask = cols < V_common
        x_s = tl.load(student_row + cols * s_student_v, mask=mask, other=float("-inf")).to(dt)
        x_t = tl.load(teacher_row + cols * s_teacher_v, mask=mask, other=float("-inf")).to(dt)
        shift_a, shift_b, sum_a, sum_b = shift_of(m_a, inv_t), shift_of(m_b, inv_t), s_a, s_b
        m_a, s_a, z_a, e_a, alpha_a = online_logsumexp(x_s, inv_t, m_a, s_a)
        m_b, s_b, z_b, e_b, alpha_b = online_logsumexp(x_t, inv_t, m_b, s_b)
        moved = ((shift_of(m_a, inv_t).to(tl.float64) - shift_a.to(tl.float64))
                 - (shift_of(m_b, inv_t).to(tl.float64) - shift_b.to(tl.float64)))  # d_a - d_b
        if KIND == FORWARD_KL:
            w = rescale(w + moved * sum_b, alpha_b) + tl.sum(xlogratio(e_b, z_b - z_a), 0).to(tl.float64)
        elif KIND == REVERSE_KL:
            w = rescale(w - moved * sum_a, alpha_a) + tl.sum(xlogratio(e_a, z_a - z_b), 0).to(tl.float64)
    shift_a = shift_of(m_a, inv_t)
    shift_b = shift_of(m_b, inv_t)
    log_s_a = tl.log(s_a)
    log_s_b = tl.log(s_b)
    tl.store(stats_ptr + 3 * r, save_stat(shift_a, log_s_a))
    tl.store(stats_ptr + 3 * r + 1, save_stat(shift_b, log_s_b))

    if KIND == FORWARD_KL:
        value = w / s_b + (log_s_a - log_s_b)
        k = tl.zeros((), tl.float64)
    elif KIND == REVERSE_KL:
        value = w / s_a + (log_s_b - log_s_a)
        k = value
    else:
        beta = hyper(beta_hi, beta_lo, FP64)
        log_beta = tl.log(beta)
        log_1m_beta = tl.log(1.0 - beta)
        log_s_a_dt = log_s_a.to(dt)
        log_s_b_dt = log_s_b.to(dt)
        kl_q = tl.zeros((), tl.float64)  # KL(q || M)
        kl_p = tl.zeros((), tl.float64)  # KL(p || M)
        for start in range(0, V_common, BLOCK_V):
            cols = start + offsets
            mask = cols < V_common
            x_s = tl.load(student_row + cols * s_student_v, mask=mask, other=float("-inf")).to(dt)
            x_t = tl.load(teacher_row + cols * s_teacher_v, mask=mask, other=float("-inf")).to(dt)
            _, log_p = exponent_and_log_prob(x_s, inv_t, shift_a, log_s_a_dt)
            _, log_q = exponent_and_log_prob(x_t, inv_t, shift_b, log_s_b_dt)
            log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
            kl_q += tl.sum(xlogratio(tl.exp(log_q), log_q - log_m), 0).to(tl.float64)
            kl_p += tl.sum(xlogratio(tl.exp(log_p), log_p - log_m), 0).to(tl.float64)
        value = beta * kl_q + (1.0 - beta) * kl_p
        k = kl_p

    tl.store(value_ptr + r, value.to(tl.float32))
    tl.store(stats_ptr + 3 * r + 2, k)


# Backward. With a = s / T, dl/ds_j = (1 / T) dl/da_j and, for j < Vc,
#   forward_kl  dl/da_j = p_j - q_j
#   reverse_kl  dl/da_j = p_j ((log p_j - log q_j) - l)                   (0 where p_j = 0)
#   jsd         dl/da_j = (1 - beta) p_j (log p_j - log M_j - KL(p || M))  (0 where p_j = 0)
# (for reverse_kl: d/da_j sum_i p_i x_i with x_i = log p_i - log q_i gives p_j x_j - p_j sum_i p_i x_i; jsd
# likewise, the q terms of KL(q || M) and the p terms of KL(p || M) contributing p_j (log p_j - log M_j) in
# total), recomputed in one sweep from the saved (A, Bq, K): with z = fma(s, 1 / T, -A_hi), log p = z - A_lo
# and p = exp(z) exp(-A_lo), and q likewise (see `split_stat`). Row r with upstream gradient g: the gradient is
# (g / T) dl/da on common columns and 0 on columns Vc <= j < Vs; the whole row is 0 if g == 0 or l = +-inf
# (no loads then); NaN on the common columns if l is NaN.
@triton.jit
def _divergence_backward_kernel(
    grad_ptr,  # [B * L] fp32 upstream gradient g of each row's value
    student_ptr,  # [B, L, Vs] student logits, strides s_student_*
    teacher_ptr,  # [Bt, Lt, Vt] teacher logits, strides s_teacher_*
    value_ptr,  # [B * L] fp32 forward values l
    stats_ptr,  # [B * L, 3] fp64 forward statistics A, Bq, K
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
    lse_a_hi, lse_a_lo, exp_neg_lo_a = split_stat(tl.load(stats_ptr + 3 * r), FP64)
    lse_b_hi, lse_b_lo, exp_neg_lo_b = split_stat(tl.load(stats_ptr + 3 * r + 1), FP64)
    k = tl.load(stats_ptr + 3 * r + 2).to(dt)
    scale = g * inv_t
    live = (g != 0.0) & (value != float("inf")) & (value != float("-inf"))
    nan_row = value != value
    live_columns = tl.where(live, V_common, 0)  # columns to read and differentiate: Vc, or none
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V_student, BLOCK_V):
        cols = start + offsets
        common = cols < live_columns
        x_s = tl.load(student_row + cols * s_student_v, mask=common, other=float("-inf")).to(dt)
        x_t = tl.load(teacher_row + cols * s_teacher_v, mask=common, other=float("-inf")).to(dt)
        z_a, log_p = exponent_and_log_prob(x_s, inv_t, lse_a_hi, lse_a_lo)
        z_b, log_q = exponent_and_log_prob(x_t, inv_t, lse_b_hi, lse_b_lo)
        p = tl.exp(z_a) * exp_neg_lo_a
        if KIND == FORWARD_KL:
            d = p - tl.exp(z_b) * exp_neg_lo_b
        elif KIND == REVERSE_KL:
            d = xlogratio(p, (log_p - log_q) - k)
        else:
            log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta)
            d = (1.0 - beta) * xlogratio(p, (log_p - log_m) - k)
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
    value [B, L] fp32 and stats [B, L, 3] fp64 (both contiguous). One program per row; none for B * L == 0."""
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
    in-place variant). grad_value and value [B, L] fp32, stats [B, L, 3] fp64, all contiguous."""
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
