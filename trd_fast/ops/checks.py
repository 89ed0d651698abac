"""Argument checks shared by the public ops: each raises ValueError naming the argument."""

from __future__ import annotations

import math
from numbers import Real

import torch

from trd_fast.constants import FLOAT_DTYPES


def describe(x) -> str:
    """What `x` is, for a message: "float32 tensor", "list", ..."""
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, bfloat16, float16 or float64, got {x.dtype}")


def logits(name: str, x) -> None:
    float_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if x.device != reference.device:
        raise ValueError(f"{name}: on {x.device} but {reference_name} is on {reference.device}")


def same_shape(name: str, shape, reference_name: str, reference_shape) -> None:
    if tuple(shape) != tuple(reference_shape):
        raise ValueError(f"{name}: shape {tuple(shape)} does not match {reference_name} {tuple(reference_shape)}")


def integer_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {describe(x)}")


def real(name: str, value) -> float:
    """A real hyper-parameter as a float: not a bool, not NaN (+-inf pass; callers bound their ranges)."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def temperature(value) -> float:
    """The softmax temperature T of every op: a finite value > 0."""
    t = real("temperature", value)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature: expected a finite value > 0, got {value!r}")
    return t


def values_checkable(x: torch.Tensor) -> bool:
    """Value checks run exactly on CPU; on CUDA they would sync the host (kernels assert there instead)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
