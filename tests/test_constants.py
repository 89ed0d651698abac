"""The constants shared by Python, the Triton kernels and the C++ kernels agree, and the kernels name them."""

import re
from pathlib import Path

import pytest

from trd_fast import constants

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "cpu" / "constants.h"
KERNEL_SOURCES = sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "csrc").rglob("*.cpp"))

# Python name -> its C++ name in csrc/cpu/constants.h
CPP_NAMES = {"FORWARD_KL": "kForwardKL", "REVERSE_KL": "kReverseKL", "JSD": "kJSD", "IGNORE_INDEX": "kIgnoreIndex"}


def header_values() -> dict[str, int]:
    """Every `kName = <int>` in the header: enumerators and constexpr integers."""
    text = HEADER.read_text(encoding="utf-8")
    return {name: int(value) for name, value in re.findall(r"\b(k[A-Za-z0-9]+)\s*=\s*(-?\d+)", text)}


def code_lines(path: Path) -> list[str]:
    """The lines of a source file with comments, docstrings and string literals removed."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        text = re.sub(r'""".*?"""', "", text, flags=re.S)
        text = re.sub(r'"[^"\n]*"', '""', text)
        return [line.split("#")[0] for line in text.splitlines()]
    text = re.sub(r'"(\\.|[^"\\\n])*"', '""', text)
    return [line.split("//")[0] for line in text.splitlines()]


def test_cpp_header_matches_python():
    values = header_values()
    for python_name, cpp_name in CPP_NAMES.items():
        assert values.get(cpp_name) == getattr(constants, python_name), (python_name, cpp_name, values)


def test_divergence_codes_index_the_names():
    for name, code in zip(("forward_kl", "reverse_kl", "jsd"), (constants.FORWARD_KL, constants.REVERSE_KL,
                                                                 constants.JSD)):
        assert constants.DIVERGENCES[code] == name


def test_triton_constants_match_python():
    pytest.importorskip("triton")
    from trd_fast.kernels import divergence, token_logprobs

    for name in ("FORWARD_KL", "REVERSE_KL", "JSD"):
        assert getattr(divergence, name).value == getattr(constants, name)
    assert token_logprobs.IGNORE_INDEX.value == constants.IGNORE_INDEX


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_name_the_constants(path):
    """No kernel source spells the ignore id or compares a divergence kind with a bare number."""
    for number, line in enumerate(code_lines(path), 1):
        assert not re.search(r"(?<![\w.])-\s*100\b", line), f"{path.name}:{number}: literal -100: {line.strip()}"
        assert not re.search(r"\b(KIND|kind)\s*[=!]=\s*\d", line), f"{path.name}:{number}: literal kind: {line.strip()}"
