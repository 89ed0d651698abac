"""Compile cases of every Triton kernel of trd_fast.kernels, for tests/gpu_compile.py: the argument variants
the launchers pass (dtypes and constexprs), with tensors standing in for the pointers.

Shapes are a production layout: rows of a [B, L, V] tensor with V = 151936 (Qwen), contiguous (the column
stride 1 is specialized away; row strides are multiples of 16, so loads vectorize), with 32-bit strides, and
64-bit ones (B * L * V >= 2^31) on the mixed-dtype variants. A new kernel needs an entry in `cases()`.
"""

import torch

from gpu_compile import Case

from trd_fast.constants import DIVERGENCES, JSD
from trd_fast.ops.registry import STATS_DTYPE

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64"}
KINDS = dict(enumerate(DIVERGENCES))  # kernel code -> divergence
# (student, teacher) dtype pairs the ops pass to the divergence kernels (fp64 only in pairs, see ops/distillation)
PAIRS = ((F32, F32), (BF16, BF16), (F16, F16), (F64, F64), (BF16, F32))
V = 151936  # columns per row
SHORT_ROWS, LONG_ROWS = 4096, 16384  # positions L of one sequence: B * L * V below / beyond 2^31


def ptr(dtype):
    """A pointer argument: only its dtype and 16-byte alignment reach the compiler."""
    return torch.empty(1, dtype=dtype)


def row_strides(prefix: str, mixed: bool) -> dict:
    rows = LONG_ROWS if mixed else SHORT_ROWS
    return {f"{prefix}_b": rows * V, f"{prefix}_l": V, f"{prefix}_v": 1}


def divergence_cases(backward: bool) -> list:
    cases = []
    for student, teacher in PAIRS:
        mixed = student != teacher
        for kind, name in KINDS.items():
            args = dict(student_ptr=ptr(student), teacher_ptr=ptr(teacher), value_ptr=ptr(F32),
                        stats_ptr=ptr(STATS_DTYPE),
                        L_student=LONG_ROWS if mixed else SHORT_ROWS, L_teacher=LONG_ROWS if mixed else SHORT_ROWS,
                        **row_strides("s_student", mixed),
                        **row_strides("s_teacher", mixed), V_common=V, inv_temperature_hi=1 / 0.7,
                        inv_temperature_lo=1e-9, beta_hi=0.3, beta_lo=1e-9, KIND=kind, FP64=student == F64)
            if backward:
                args.update(grad_ptr=ptr(F32), out_ptr=ptr(student), **row_strides("s_out", mixed), V_student=V)
            heaviest = kind == JSD and student in (F32, F64)  # jsd: two sweeps (forward), log M per column
            cases.append(Case(f"{name} {NAMES[student]}/{NAMES[teacher]}", args, every_config=heaviest))
    return cases


def token_logprobs_cases(backward: bool) -> list:
    cases = []
    for dtype in (F32, BF16, F16, F64):
        mixed = dtype == BF16  # bf16 logits of a long batch: 64-bit strides
        args = dict(logits_ptr=ptr(dtype), ids_ptr=ptr(torch.int64), lse_ptr=ptr(STATS_DTYPE),
                    L=LONG_ROWS if mixed else SHORT_ROWS, **row_strides("s_logits", mixed), V=V,
                    inv_temperature_hi=1 / 0.7, inv_temperature_lo=1e-9, FP64=dtype == F64)
        if backward:
            args.update(grad_ptr=ptr(F32), out_ptr=ptr(dtype), **row_strides("s_out", mixed))
        else:
            args.update(logprobs_ptr=ptr(F32))
        cases.append(Case(NAMES[dtype], args, every_config=dtype in (F32, F64)))
    return cases


def prefix_scan_cases() -> list:
    return [Case(NAMES[dtype], dict(signal_ptr=ptr(dtype), lengths_ptr=ptr(torch.int64), cumsum_ptr=ptr(dtype),
                                    first_ptr=ptr(torch.int64), L=SHORT_ROWS, s_signal_b=SHORT_ROWS, s_signal_l=1,
                                    window=4, threshold_hi=0.5, threshold_lo=1e-9, FP64=dtype == F64))
            for dtype in (F32, BF16, F16, F64)]


def check_token_ids_cases() -> list:
    from trd_fast.kernels.token_logprobs import CHECK_BLOCK

    return [Case("int64 ids", dict(ids_ptr=ptr(torch.int64), N=SHORT_ROWS * 4, V=V, BLOCK=CHECK_BLOCK))]


def cases() -> dict:
    """{"module.kernel": [Case, ...]} for every kernel of trd_fast.kernels."""
    return {
        "divergence._divergence_forward_kernel": divergence_cases(backward=False),
        "divergence._divergence_backward_kernel": divergence_cases(backward=True),
        "token_logprobs._token_logprobs_kernel": token_logprobs_cases(backward=False),
        "token_logprobs._token_logprobs_backward_kernel": token_logprobs_cases(backward=True),
        "prefix_scan._prefix_scan_kernel": prefix_scan_cases(),
        "token_logprobs._check_token_ids_kernel": check_token_ids_cases(),
    }
