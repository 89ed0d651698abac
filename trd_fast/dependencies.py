"""The dependency versions trd_fast supports, and the check each part runs on the dependency it imports.

pyproject.toml declares the same ranges (tests/test_dependencies.py keeps the two equal). A version outside its
range fails with one ImportError when the part that needs it is imported, instead of misbehaving later.
"""

from __future__ import annotations

import re

# package: (lowest supported version, first unsupported version or None). CI tests the pure-Python floors in
# .venv-floor (make test-floors).
SUPPORTED = {
    "torch": ("2.11", None),            # CI: 2.13; the GPU image (bench/gpu_check.sh): 2.11
    "transformers": ("5.0.0", None),    # CI: 5.0.0 and the newest; the GPU image: 5.17
    "trl": ("1.7.0", None),             # the first TRL whose GKD loss takes num_items_in_batch
    "peft": ("0.18.0", None),           # older peft imports a cache class transformers 5 removed
    "triton": ("3.6", None),            # CI: the newest (interpreted); the GPU image: 3.6
}


def check_version(package: str, version: str, who: str) -> None:
    """ImportError naming `who` (the part that needs the package) when `version` of `package` (a key of
    SUPPORTED) is below its lowest supported version or at/after its first unsupported one. Pre-release and
    local suffixes are ignored ("2.13.0+cpu" is 2.13.0); a version with no leading number passes."""
    lowest, first_unsupported = SUPPORTED[package]
    installed = release(version)
    if installed is None:
        return
    if installed < release(lowest) or (first_unsupported is not None and installed >= release(first_unsupported)):
        bound = f">= {lowest}" + (f", < {first_unsupported}" if first_unsupported else "")
        raise ImportError(f"{who} needs {package} {bound}; the installed {package} is {version}")


def release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string, zero-padded to three numbers; None without a leading number."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        return None
    numbers = [int(n) for n in match.group().split(".")]
    return tuple(numbers + [0] * (3 - len(numbers)))
