"""Bad arguments raise ValueError naming the argument: a table of cases, then hypothesis-generated ones."""

import re

import pytest
import torch
from conftest import randn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trd_fast

META = torch.device("meta")  # a second device on a CPU-only machine, for device mismatches


def loss_call(backend, student=None, teacher=None, **kwargs):
    student = randn(2, 3, 11) if student is None else student
    teacher = randn(2, 3, 11, seed=1) if teacher is None else teacher
    return lambda: trd_fast.distillation_loss(student, teacher, backend=backend, **kwargs)


def sparse(ids, logprobs=None):
    ids = torch.as_tensor(ids)
    return trd_fast.SparseTeacher(ids, torch.zeros(ids.shape) if logprobs is None else logprobs)


def logprobs_call(backend, logits=None, ids=None, **kwargs):
    logits = randn(2, 3, 11) if logits is None else logits
    ids = torch.zeros(2, 3, dtype=torch.int64) if ids is None else ids
    return lambda: trd_fast.token_logprobs(logits, ids, backend=backend, **kwargs)


def scan_call(backend, signal=None, lengths=None, threshold=0.5, **kwargs):
    signal = torch.zeros(3, 6) if signal is None else signal
    lengths = torch.tensor([6, 0, 2]) if lengths is None else lengths
    return lambda: trd_fast.prefix_scan(signal, lengths, threshold=threshold, backend=backend, **kwargs)


# (argument named in the message, call maker)
CASES = {
    # distillation_loss: tensors
    "student-list": ("student_logits", lambda b: loss_call(b, student=[[0.0, 1.0]] * 6)),
    "student-int": ("student_logits", lambda b: loss_call(b, student=torch.zeros(2, 3, 11, dtype=torch.int64))),
    "student-bool": ("student_logits", lambda b: loss_call(b, student=torch.zeros(2, 3, 11, dtype=torch.bool))),
    "student-0d": ("student_logits", lambda b: loss_call(b, student=torch.tensor(1.0), teacher=torch.tensor(1.0))),
    "student-V=0": ("student_logits", lambda b: loss_call(b, student=torch.zeros(2, 3, 0))),
    "teacher-none": ("teacher_logits", lambda b: (lambda: trd_fast.distillation_loss(randn(2, 11), None, backend=b))),
    "teacher-int": ("teacher_logits", lambda b: loss_call(b, teacher=torch.zeros(2, 3, 11, dtype=torch.int32))),
    "teacher-shape": ("teacher_logits", lambda b: loss_call(b, teacher=randn(3, 2, 11))),
    "teacher-rank": ("teacher_logits", lambda b: loss_call(b, teacher=randn(6, 11))),
    "teacher-device": ("teacher_logits", lambda b: loss_call(b, teacher=torch.zeros(2, 3, 11, device=META))),
    "student-device": ("teacher_logits|student_logits",
                       lambda b: loss_call(b, student=torch.zeros(2, 3, 11, device=META))),
    # distillation_loss: options
    "divergence": ("divergence", lambda b: loss_call(b, divergence="kl")),
    "divergence-case": ("divergence", lambda b: loss_call(b, divergence="Forward_KL")),
    "reduction": ("reduction", lambda b: loss_call(b, reduction="avg")),
    "backend": ("backend", lambda b: loss_call("cuda")),
    "beta-low": ("beta", lambda b: loss_call(b, divergence="jsd", beta=-0.1)),
    "beta-high": ("beta", lambda b: loss_call(b, divergence="jsd", beta=1.5)),
    "beta-nan": ("beta", lambda b: loss_call(b, divergence="jsd", beta=float("nan"))),
    "temperature-0": ("temperature", lambda b: loss_call(b, temperature=0.0)),
    "temperature-neg": ("temperature", lambda b: loss_call(b, temperature=-1.0)),
    "temperature-nan": ("temperature", lambda b: loss_call(b, temperature=float("nan"))),
    "top_k-0": ("top_k", lambda b: loss_call(b, top_k=0)),
    "top_k-neg": ("top_k", lambda b: loss_call(b, top_k=-2)),
    "top_k-float": ("top_k", lambda b: loss_call(b, top_k=2.5)),
    "clip-neg": ("clip", lambda b: loss_call(b, clip=-0.1)),
    "clip-nan": ("clip", lambda b: loss_call(b, clip=float("nan"))),
    "weight-shape": ("weight", lambda b: loss_call(b, weight=torch.ones(2, 4))),
    "weight-list": ("weight", lambda b: loss_call(b, weight=[[1.0] * 3] * 2)),
    "weight-device": ("weight", lambda b: loss_call(b, weight=torch.ones(2, 3, device=META))),
    "normalizer-sum": ("normalizer", lambda b: loss_call(b, normalizer=2.0, reduction="sum")),
    "normalizer-none": ("normalizer", lambda b: loss_call(b, normalizer=torch.tensor(2.0), reduction="none")),
    "normalizer-1d": ("normalizer", lambda b: loss_call(b, normalizer=torch.ones(1))),
    "normalizer-str": ("normalizer", lambda b: loss_call(b, normalizer="6")),
    "normalizer-nan": ("normalizer", lambda b: loss_call(b, normalizer=float("nan"))),
    "normalizer-nan-tensor": ("normalizer", lambda b: loss_call(b, normalizer=torch.tensor(float("nan")))),
    # SparseTeacher
    "sparse+top_k": ("top_k", lambda b: loss_call(b, teacher=sparse(torch.zeros(2, 3, 2, dtype=torch.int64)),
                                                   top_k=2)),
    "sparse-id-high": ("teacher_logits", lambda b: loss_call(b, teacher=sparse([[[0, 11]] * 3] * 2))),
    "sparse-id-neg": ("teacher_logits", lambda b: loss_call(b, teacher=sparse([[[0, -2]] * 3] * 2))),
    "sparse-id-dup": ("teacher_logits", lambda b: loss_call(b, teacher=sparse([[[4, 4]] * 3] * 2))),
    "sparse-shape": ("teacher_logits", lambda b: loss_call(b, teacher=sparse([[0, 1]] * 6))),
    "sparse-float-ids": ("ids", lambda b: (lambda: sparse(torch.zeros(2, 3)))),
    "sparse-int-logprobs": ("logprobs", lambda b: (lambda: sparse(torch.zeros(2, 3, dtype=torch.int64),
                                                                  torch.zeros(2, 3, dtype=torch.int64)))),
    "sparse-mismatch": ("SparseTeacher", lambda b: (lambda: sparse(torch.zeros(2, 3, dtype=torch.int64),
                                                                   torch.zeros(2, 4)))),
    # token_logprobs
    "logits-int": ("logits", lambda b: logprobs_call(b, logits=torch.zeros(2, 3, 11, dtype=torch.int64))),
    "logits-tuple": ("logits", lambda b: logprobs_call(b, logits=(1.0, 2.0))),
    "logits-0d": ("logits", lambda b: logprobs_call(b, logits=torch.tensor(0.0), ids=torch.tensor(0))),
    "ids-float": ("token_ids", lambda b: logprobs_call(b, ids=torch.zeros(2, 3))),
    "ids-shape": ("token_ids", lambda b: logprobs_call(b, ids=torch.zeros(3, 2, dtype=torch.int64))),
    "ids-high": ("token_ids", lambda b: logprobs_call(b, ids=torch.full((2, 3), 11))),
    "ids-neg": ("token_ids", lambda b: logprobs_call(b, ids=torch.full((2, 3), -1))),
    "ids-101": ("token_ids", lambda b: logprobs_call(b, ids=torch.full((2, 3), -101))),
    "ids-device": ("token_ids", lambda b: logprobs_call(b, ids=torch.zeros(2, 3, dtype=torch.int64, device=META))),
    "logprobs-temperature": ("temperature", lambda b: logprobs_call(b, temperature=0.0)),
    "logprobs-temperature-nan": ("temperature", lambda b: logprobs_call(b, temperature=float("nan"))),
    "logprobs-backend": ("backend", lambda b: logprobs_call("gpu")),
    # prefix_scan
    "signal-1d": ("signal", lambda b: scan_call(b, signal=torch.zeros(6), lengths=torch.tensor([6]))),
    "signal-3d": ("signal", lambda b: scan_call(b, signal=torch.zeros(3, 6, 1))),
    "signal-int": ("signal", lambda b: scan_call(b, signal=torch.zeros(3, 6, dtype=torch.int32))),
    "signal-list": ("signal", lambda b: scan_call(b, signal=[[0.0] * 6] * 3)),
    "lengths-float": ("lengths", lambda b: scan_call(b, lengths=torch.tensor([6.0, 0.0, 2.0]))),
    "lengths-shape": ("lengths", lambda b: scan_call(b, lengths=torch.tensor([6, 0]))),
    "lengths-high": ("lengths", lambda b: scan_call(b, lengths=torch.tensor([7, 0, 2]))),
    "lengths-neg": ("lengths", lambda b: scan_call(b, lengths=torch.tensor([6, -1, 2]))),
    "lengths-device": ("lengths", lambda b: scan_call(b, lengths=torch.tensor([6, 0, 2], device=META))),
    "window-0": ("window", lambda b: scan_call(b, window=0)),
    "window-float": ("window", lambda b: scan_call(b, window=1.5)),
    "threshold-str": ("threshold", lambda b: scan_call(b, threshold="0.5")),
    "threshold-none": ("threshold", lambda b: scan_call(b, threshold=None)),
    "threshold-nan": ("threshold", lambda b: scan_call(b, threshold=float("nan"))),
    "scan-backend": ("backend", lambda b: scan_call("numpy")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_raises_value_error(backend, case):
    name, make = CASES[case]
    with pytest.raises(ValueError, match=name):
        make(backend)()


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("TRD_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="TRD_FAST_BACKEND"):
        trd_fast.distillation_loss(randn(2, 5), randn(2, 5, seed=1))


# ---------------------------------------------------------------------------------------------- hypothesis

VALID_NAMES = ("forward_kl", "reverse_kl", "jsd", "mean", "sum", "none", "auto", "cpp", "triton", "torch")


def bad_float_tensor():
    return st.sampled_from([
        torch.zeros(2, 3, 5, dtype=torch.int64), torch.zeros(2, 3, 5, dtype=torch.int32),
        torch.zeros(2, 3, 5, dtype=torch.uint8), torch.zeros(2, 3, 5, dtype=torch.bool),
        torch.zeros(2, 3, 5, dtype=torch.complex64), torch.tensor(0.5), torch.zeros(2, 3, 0), None, 3.0, "logits",
        [[0.0] * 5] * 6])


def bad_real(low=None, high=None, optional=False):
    """Numbers outside [low, high] (open end where None), NaN, or things that are not real numbers (None too,
    unless the argument is optional)."""
    out = [st.just(float("nan")), st.sampled_from(["1", [1.0], 1j] + ([] if optional else [None]))]
    if low is not None:
        out.append(st.floats(max_value=low, exclude_max=True, allow_nan=False))
    if high is not None:
        out.append(st.floats(min_value=high, exclude_min=True, allow_nan=False))
    return st.one_of(out)


@st.composite
def bad_loss_arguments(draw):
    """distillation_loss kwargs with exactly one malformed argument, and the name the message must hold."""
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    vocab = draw(st.integers(1, 9))
    kwargs = dict(student_logits=torch.randn(*lead, vocab), teacher_logits=torch.randn(*lead, draw(st.integers(1, 9))),
                  divergence=draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])),
                  beta=draw(st.floats(0, 1)), temperature=draw(st.floats(0.05, 20)),
                  reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    fault = draw(st.sampled_from(["student_logits", "teacher_logits", "teacher_shape", "divergence", "reduction",
                                  "beta", "temperature", "top_k", "clip", "weight", "normalizer", "backend",
                                  "sparse_ids", "sparse_top_k"]))
    if fault == "student_logits":
        kwargs["student_logits"] = draw(bad_float_tensor())
    elif fault == "teacher_logits":
        kwargs["teacher_logits"] = draw(bad_float_tensor())
    elif fault == "teacher_shape":
        other = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3).filter(lambda s: tuple(s) != lead))
        kwargs["teacher_logits"] = torch.randn(*other, vocab)
        fault = "teacher_logits"
    elif fault in ("divergence", "reduction", "backend"):
        kwargs[fault] = draw(st.one_of(st.text(max_size=12), st.none(), st.integers()).filter(
            lambda v: v not in VALID_NAMES and not (v is None and fault == "backend")))  # backend=None is auto
    elif fault == "beta":
        kwargs["beta"] = draw(bad_real(0.0, 1.0))
    elif fault == "temperature":
        kwargs["temperature"] = draw(st.one_of(bad_real(), st.floats(max_value=0.0)))
    elif fault == "top_k":
        kwargs["top_k"] = draw(st.one_of(st.integers(max_value=0), st.floats(0.5, 10).filter(lambda v: v != int(v)),
                                         st.just("3")))
    elif fault == "clip":
        kwargs["clip"] = draw(bad_real(low=0.0, optional=True))
    elif fault == "weight":
        other = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3).filter(lambda s: tuple(s) != lead))
        kwargs["weight"] = draw(st.sampled_from([torch.ones(other), [1.0, 0.0], 1.0,
                                                 torch.ones(lead, device=META)]))
    elif fault == "normalizer":
        if draw(st.booleans()):
            kwargs["reduction"] = draw(st.sampled_from(["sum", "none"]))
            kwargs["normalizer"] = draw(st.sampled_from([1.0, torch.tensor(2.0), 0]))
        else:
            kwargs["reduction"] = "mean"
            kwargs["normalizer"] = draw(st.sampled_from([torch.ones(2), torch.ones(1, 1), "4", None, [2.0]])
                                        .filter(lambda v: v is not None))
    elif fault == "sparse_ids":
        if not torch.Size(lead).numel():  # an empty batch has no ids to reject
            lead = (1,)
            kwargs["student_logits"] = torch.randn(1, vocab)
        ids = torch.full((*lead, draw(st.integers(1, 4))), -1, dtype=torch.int64)
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = draw(
            st.one_of(st.integers(-2 ** 62, -2), st.integers(vocab, 2 ** 62)))
        kwargs["teacher_logits"] = trd_fast.SparseTeacher(ids, torch.zeros(ids.shape))
        fault = "teacher_logits"
    elif fault == "sparse_top_k":
        k = draw(st.integers(1, 4))
        kwargs["teacher_logits"] = trd_fast.SparseTeacher(torch.full((*lead, k), -1), torch.zeros(*lead, k))
        kwargs["top_k"] = draw(st.integers(1, 10))
        fault = "top_k"
    return kwargs, fault


# The backend fixture only names a backend (no state), so reusing it across examples is safe.
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(arguments=bad_loss_arguments())
def test_malformed_loss_arguments_raise_value_error(backend, arguments):
    kwargs, name = arguments
    kwargs.setdefault("backend", backend)
    student, teacher = kwargs.pop("student_logits"), kwargs.pop("teacher_logits")
    with pytest.raises(ValueError, match=re.escape(name)):
        trd_fast.distillation_loss(student, teacher, **kwargs)


@st.composite
def bad_other_arguments(draw):
    """token_logprobs or prefix_scan calls with one malformed argument, and the name the message must hold."""
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    vocab = draw(st.integers(1, 9))
    if draw(st.booleans()):
        args = dict(logits=torch.randn(*lead, vocab), token_ids=torch.zeros(lead, dtype=torch.int64),
                    temperature=draw(st.floats(0.05, 20)))
        fault = draw(st.sampled_from(["logits", "token_ids", "ids_range", "temperature", "backend"]))
        if fault == "logits":
            args["logits"] = draw(bad_float_tensor())
        elif fault == "token_ids":
            args["token_ids"] = draw(st.sampled_from([torch.zeros(lead), torch.zeros(*lead, 1, dtype=torch.int64),
                                                      [0] * 3, torch.zeros(lead, dtype=torch.int64, device=META)]))
        elif fault == "ids_range":
            if not torch.Size(lead).numel():
                lead = (1,)
                args = dict(args, logits=torch.randn(1, vocab))
            ids = torch.zeros(lead, dtype=torch.int64)
            bad = draw(st.one_of(st.integers(-10 ** 6, -101), st.integers(-99, -1), st.integers(vocab, 10 ** 6)))
            ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = bad
            args["token_ids"], fault = ids, "token_ids"
        elif fault == "temperature":
            args["temperature"] = draw(st.one_of(bad_real(), st.floats(max_value=0.0)))
        else:
            args["backend"] = draw(st.text(max_size=8).filter(lambda v: v not in ("auto", "cpp", "triton", "torch")))
        return trd_fast.token_logprobs, args, fault
    batch, length = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    args = dict(signal=torch.rand(batch, length), lengths=torch.zeros(batch, dtype=torch.int64),
                threshold=draw(st.floats(-2, 2)), window=draw(st.integers(1, 8)))
    fault = draw(st.sampled_from(["signal", "lengths", "lengths_range", "window", "threshold", "backend"]))
    if fault == "signal":
        args["signal"] = draw(st.sampled_from([torch.zeros(batch), torch.zeros(batch, length, 1),
                                               torch.zeros(batch, length, dtype=torch.int64), None, "signal"]))
    elif fault == "lengths":
        args["lengths"] = draw(st.sampled_from([torch.zeros(batch), torch.zeros(batch + 1, dtype=torch.int64),
                                                torch.zeros(batch, 1, dtype=torch.int64), None]))
    elif fault == "lengths_range":
        batch = max(batch, 1)
        args["signal"] = torch.rand(batch, length)
        lengths = torch.zeros(batch, dtype=torch.int64)
        lengths[draw(st.integers(0, batch - 1))] = draw(st.one_of(st.integers(-2 ** 62, -1),
                                                                  st.integers(length + 1, 2 ** 62)))
        args["lengths"], fault = lengths, "lengths"
    elif fault == "window":
        args["window"] = draw(st.one_of(st.integers(max_value=0), st.floats(1.1, 5.9), st.just(None)))
    elif fault == "threshold":
        args["threshold"] = draw(st.sampled_from(["0.5", None, [0.5], torch.ones(2)]))
    else:
        args["backend"] = draw(st.text(max_size=8).filter(lambda v: v not in ("auto", "cpp", "triton", "torch")))
    signal, lengths = args.pop("signal"), args.pop("lengths")
    return (lambda **kw: trd_fast.prefix_scan(signal, lengths, **kw)), args, fault


@SETTINGS
@given(call=bad_other_arguments())
def test_malformed_logprob_and_scan_arguments_raise_value_error(backend, call):
    fn, kwargs, name = call
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=re.escape(name)):
        if fn is trd_fast.token_logprobs:
            fn(kwargs.pop("logits"), kwargs.pop("token_ids"), **kwargs)
        else:
            fn(**kwargs)
