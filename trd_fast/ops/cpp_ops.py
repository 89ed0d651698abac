"""The C++ backend: ops defined and implemented in csrc/ (trd_fast._C); fakes and autograd registered here."""

from __future__ import annotations

from trd_fast.ops.backend import EXTENSION
from trd_fast.ops.opset import OpSet, register_autograd, register_fakes

CPP_OPS = OpSet(suffix="")

if EXTENSION is not None:
    register_fakes(CPP_OPS)
    register_autograd(CPP_OPS)
