"""fused_linear_distillation_loss: hidden states and LM heads in, the distillation loss out, no [N, V] logits."""

from __future__ import annotations

import math

import torch

from trd_fast import reference
from trd_fast.ops import checks
from trd_fast.ops.distillation import check_reduction_arguments, check_sparse_teacher, distillation_loss
from trd_fast.ops.options import LossOptions
from trd_fast.ops.reduction import reduce_values
from trd_fast.ops.registry import resolve
from trd_fast.ops.sparse_teacher import SparseTeacher


def fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight=None, *,
                                   student_bias=None, teacher_bias=None, student_logit_scale=1.0,
                                   teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                   divergence="forward_kl", beta=0.5, temperature=1.0, top_k=None, clip=None,
                                   weight=None, normalizer=None, reduction="mean", return_per_token=False,
                                   backend=None):
    """distillation_loss(z_s, z_t, ...) on the logits the LM heads imply, without forming them.

    student_hidden [..., H_s] and student_weight [V_s, H_s] (bias [V_s]): z_s = c tanh(a (h W^T + b) / c) with
    a = student_logit_scale and c = student_softcap (no tanh without one); the teacher likewise from
    teacher_hidden [..., H_t] (same leading shape) and teacher_weight [V_t, H_t], or a SparseTeacher in place of
    teacher_hidden with teacher_weight None. Any float dtypes; the projections accumulate in fp32 (fp64 when an
    input is float64). Every other argument, the result (loss, or (loss, per_token [...] fp32)) and the
    semantics are distillation_loss's (docs/design.md, "Fused linear"). Gradients reach student_hidden,
    student_weight and student_bias (in their dtypes), never the teacher. Memory beyond the inputs, the
    gradients and O(N) row statistics does not grow with N: the logits exist one row block at a time.
    Raises ValueError naming the argument for a bad shape, dtype, device, scale, softcap or option.
    """
    options = LossOptions(divergence, beta, temperature, top_k, clip, reduction)
    sparse = isinstance(teacher_hidden, SparseTeacher)
    student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap = head_options(
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    _check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 sparse, teacher_logit_scale, teacher_softcap)
    if sparse:
        check_sparse_teacher("teacher_hidden", teacher_hidden, options, student_hidden, "student_hidden",
                             student_weight.shape[0])
    check_reduction_arguments(options, weight, normalizer, student_hidden, "student_hidden")
    if not isinstance(return_per_token, bool):
        raise ValueError(f"return_per_token: expected a bool, got {return_per_token!r}")
    name = resolve(backend, student_hidden.device)
    if name == "torch":
        student = reference.project_logits(student_hidden, student_weight, student_bias,
                                           logit_scale=student_logit_scale, softcap=student_softcap)
        teacher = teacher_hidden.detach() if sparse else reference.project_logits(
            teacher_hidden.detach(), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
            logit_scale=teacher_logit_scale, softcap=teacher_softcap)
        return distillation_loss(student, teacher, divergence=divergence, beta=beta, temperature=temperature,
                                 top_k=top_k, clip=clip, weight=weight, normalizer=normalizer, reduction=reduction,
                                 return_per_token=return_per_token, backend="torch")
    lead = student_hidden.shape[:-1]
    flat_weight = None if weight is None else weight.detach().reshape(-1)
    problem = _problem_arguments(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                 teacher_bias, student_logit_scale, teacher_logit_scale, student_softcap,
                                 teacher_softcap, options, name)
    if options.reduction == "none":
        values = torch.ops.trd_fast.fused_linear_values(*problem)[0]
        loss = reduce_values(values, clip=options.clip, weight=flat_weight, normalizer=None, reduction="none")
        loss = loss.view(lead)
    else:
        if normalizer is not None and not isinstance(normalizer, torch.Tensor):
            normalizer = torch.full((), float(normalizer), dtype=torch.float32, device=student_hidden.device)
        wanted = [torch.is_grad_enabled() and t is not None and t.requires_grad
                  for t in (student_hidden, student_weight, student_bias)]
        loss, values = torch.ops.trd_fast.fused_linear_loss(*problem, flat_weight, normalizer, options.clip, options.reduction,
                                         wanted)[:2]
    return (loss, values.detach().view(lead)) if return_per_token else loss


def head_options(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap):
    """The logit scales (finite reals) and softcaps (None or finite > 0), validated, as floats."""
    scales = []
    for name, value in (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale)):
        value = checks.real(name, value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        scales.append(value)
    caps = []
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None:
            value = checks.real(name, value)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected None or a finite value > 0, got {value!r}")
        caps.append(value)
    return (*scales, *caps)


def _check_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sparse,
                 teacher_logit_scale, teacher_softcap) -> None:
    _check_head("student", student_hidden, student_weight, student_bias, student_hidden)
    if not sparse:
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, student_hidden)
        checks.same_shape("teacher_hidden leading shape", teacher_hidden.shape[:-1], "student_hidden leading shape",
                          student_hidden.shape[:-1])
        return
    for name, value in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
                        ("teacher_softcap", teacher_softcap)):
        if value is not None:
            raise ValueError(f"{name}: must be None with a SparseTeacher (its log-probs are the targets)")
    if teacher_logit_scale != 1.0:
        raise ValueError("teacher_logit_scale: must be 1.0 with a SparseTeacher (its log-probs are the targets)")
    if teacher_hidden.shape[-1] == 0:
        raise ValueError("teacher_hidden (SparseTeacher): expected at least one id per position, got k = 0")


def _check_head(prefix: str, hidden, weight, bias, student_hidden) -> None:
    """hidden [..., H], weight [V, H], bias None or [V]: float tensors on student_hidden's device."""
    checks.float_tensor(f"{prefix}_hidden", hidden)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{prefix}_hidden: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight is None:
        raise ValueError(f"{prefix}_weight: expected the LM head [V, H], got None")
    checks.float_tensor(f"{prefix}_weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight: expected shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight: shape {tuple(weight.shape)} does not match the hidden width "
                         f"H = {hidden.shape[-1]} of {prefix}_hidden")
    if bias is not None:
        checks.float_tensor(f"{prefix}_bias", bias)
        checks.same_shape(f"{prefix}_bias", bias.shape, f"{prefix}_weight rows", weight.shape[:1])
    for name, x in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if x is not None:
            checks.same_device(name, x, "student_hidden", student_hidden)


def _problem_arguments(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
                       options: LossOptions, backend: str) -> tuple:
    """The ops' shared leading arguments (fused_linear_ops.py), rows flattened to [N, *]."""
    width = student_hidden.shape[-1]
    hidden = student_hidden.reshape(-1, width)
    if isinstance(teacher_hidden, SparseTeacher):
        k = teacher_hidden.shape[-1]
        teacher = (None, None, None, teacher_hidden.ids.reshape(-1, k),
                   teacher_hidden.logprobs.detach().reshape(-1, k))
        top_k = None
    else:
        teacher = (teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                   None if teacher_bias is None else teacher_bias.detach(), None, None)
        common = min(student_weight.shape[0], teacher_weight.shape[0])
        top_k = None if options.top_k is None else min(options.top_k, common)
    kind, beta = options.kernel_kind
    return (hidden, student_weight, student_bias, *teacher, student_logit_scale, teacher_logit_scale,
            student_softcap, teacher_softcap, kind, beta, options.temperature, top_k, backend)
