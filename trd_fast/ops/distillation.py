"""distillation_loss: per-token student/teacher divergences, fused, with clip, weights and reductions."""

from __future__ import annotations

import torch

from trd_fast import reference
from trd_fast.ops import checks
from trd_fast.ops.options import LossOptions
from trd_fast.ops.reduction import reduce_values
from trd_fast.ops.registry import opset, resolve
from trd_fast.ops.rows import as_rows
from trd_fast.ops.sparse_teacher import SparseTeacher


def distillation_loss(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                      top_k=None, clip=None, weight=None, normalizer=None, reduction="mean",
                      return_per_token=False, inplace_backward=False, backend=None):
    """Divergence between student and teacher next-token distributions, per position, then reduced.

    student_logits [..., V_s] (gradient flows here), teacher_logits [..., V_t] or a SparseTeacher (no
    gradient). Returns the loss, or (loss, per_token [...] fp32) with return_per_token=True. See
    docs/design.md for the contract: common vocabulary, -inf handling, clip -> weight -> reduction order.
    """
    options = LossOptions(divergence, beta, temperature, top_k, clip, reduction)
    _check(student_logits, teacher_logits, options, weight, normalizer, return_per_token, inplace_backward)
    name = resolve(backend, student_logits.device)
    if name == "torch":
        values = reference.per_position_divergence(
            student_logits, teacher_logits, divergence=divergence, beta=options.beta,
            temperature=options.temperature, top_k=options.top_k).to(torch.float32)
    else:
        values = _fused_values(student_logits, teacher_logits, options, name, inplace_backward)
    loss = reduce_values(values, clip=options.clip, weight=weight, normalizer=normalizer, reduction=reduction)
    return (loss, values.detach()) if return_per_token else loss


def _fused_values(student, teacher, options: LossOptions, name: str, inplace_backward: bool) -> torch.Tensor:
    """Per-position l [...] fp32 from the backend's fused kernel (differentiable w.r.t. student)."""
    lead = student.shape[:-1]
    student_rows, teacher_rows = _support(student, teacher, options)
    student_rows, teacher_rows = as_rows(student_rows), as_rows(teacher_rows)
    if (student_rows.dtype == torch.float64) != (teacher_rows.dtype == torch.float64):
        student_rows, teacher_rows = student_rows.double(), teacher_rows.double()  # fp64 kernels take fp64 pairs
    kind, beta = options.kernel_kind
    value, _ = opset(name).op("divergence")(student_rows, teacher_rows, kind, beta, options.temperature,
                                            inplace_backward)
    return value.view(lead)


def _support(student, teacher, options: LossOptions):
    """Student and teacher logits over the divergence's support: the common columns, or gathered ids.

    Top-k and sparse teachers reduce to the dense kernel over [..., k] gathered rows: -inf on both sides
    marks an empty slot (zero probability, zero gradient); the gather's backward scatters the gradient.
    """
    if isinstance(teacher, SparseTeacher):
        empty = teacher.ids < 0
        student_sub = student.gather(-1, teacher.ids.clamp(min=0))
        minus_inf = torch.tensor(float("-inf"), device=student.device)
        return (torch.where(empty, minus_inf.to(student.dtype), student_sub),
                torch.where(empty, minus_inf.to(teacher.logprobs.dtype), teacher.logprobs.detach()))
    teacher = teacher.detach()
    if options.top_k is None:
        return student, teacher
    width = min(student.shape[-1], teacher.shape[-1])
    common = teacher[..., :width]
    ids = common.topk(min(options.top_k, width), dim=-1, sorted=False).indices  # [..., k]
    return student.gather(-1, ids), common.gather(-1, ids)


def _check(student, teacher, options: LossOptions, weight, normalizer, return_per_token, inplace_backward):
    checks.logits("student_logits", student)
    lead = student.shape[:-1]
    if isinstance(teacher, SparseTeacher):
        check_sparse_teacher("teacher_logits", teacher, options, student, "student_logits", student.shape[-1])
    else:
        checks.logits("teacher_logits", teacher)
        checks.same_shape("teacher_logits leading shape", teacher.shape[:-1], "student_logits leading shape", lead)
        checks.same_device("teacher_logits", teacher, "student_logits", student)
    check_reduction_arguments(options, weight, normalizer, student, "student_logits")
    for flag_name, flag in (("return_per_token", return_per_token), ("inplace_backward", inplace_backward)):
        if not isinstance(flag, bool):
            raise ValueError(f"{flag_name}: expected a bool, got {flag!r}")


def check_sparse_teacher(name: str, teacher: SparseTeacher, options: LossOptions, student, student_name: str,
                         vocab: int) -> None:
    """A SparseTeacher passed as `name` against the student input `student` [..., *] with `vocab` columns."""
    if options.top_k is not None:
        raise ValueError("top_k: cannot be combined with a SparseTeacher (its ids are the support)")
    checks.same_shape(f"{name} (SparseTeacher) leading shape", teacher.shape[:-1],
                      f"{student_name} leading shape", student.shape[:-1])
    checks.same_device(name, teacher.ids, student_name, student)
    if checks.values_checkable(teacher.ids):
        _check_sparse_ids(name, teacher.ids, vocab)


def check_reduction_arguments(options: LossOptions, weight, normalizer, student, student_name: str) -> None:
    """weight [...] and normalizer against the student input `student` [..., *] (its leading shape, its device)."""
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.is_complex():
            raise ValueError(f"weight: expected a bool or real tensor, got {type(weight).__name__}")
        checks.same_shape("weight", weight.shape, f"{student_name} leading shape", student.shape[:-1])
        checks.same_device("weight", weight, student_name, student)
    if normalizer is not None:
        if options.reduction != "mean":
            raise ValueError(f"normalizer: only valid with reduction='mean', got reduction={options.reduction!r}")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.dim() != 0 or normalizer.is_complex():
                raise ValueError(f"normalizer: expected a float or a 0-d tensor, got shape {tuple(normalizer.shape)}")
            if checks.values_checkable(normalizer) and bool(normalizer.isnan()):
                raise ValueError("normalizer: expected a real number, got a NaN tensor")
        else:
            checks.real("normalizer", normalizer)


def _check_sparse_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    if ids.numel() and not bool(((ids >= -1) & (ids < vocab)).all()):
        raise ValueError(f"{name} (SparseTeacher) ids: expected values in [0, {vocab}) or -1 for an empty "
                         f"slot, got min {int(ids.min())}, max {int(ids.max())}")
    ordered = ids.sort(dim=-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise ValueError(f"{name} (SparseTeacher) ids: ids must be distinct within a position")
