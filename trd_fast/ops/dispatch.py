"""The op set behind each kernel backend name."""

from __future__ import annotations

import importlib
import sys

from trd_fast.ops.cpp_ops import CPP_OPS
from trd_fast.ops.opset import OpSet

TRITON_MODULE = "trd_fast.ops.triton_ops"


def opset(name: str) -> OpSet:
    """"cpp" -> the C++ ops, "triton" -> the Triton ops (imported on first use when not preloaded)."""
    if name == "cpp":
        return CPP_OPS
    module = sys.modules.get(TRITON_MODULE) or importlib.import_module(TRITON_MODULE)
    return module.TRITON_OPS
