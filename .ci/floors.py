"""The declared floors of pyproject.toml, and the pip constraints of the floor venv (make test-floors).

    python .ci/floors.py TORCH    prints one `name==floor` line per floored pure-Python requirement, and torch==TORCH

The floor venv pins every requirement with a `>=` floor to that floor, except torch (CI has only one CPU wheel, the
Makefile's CPU_TORCH, passed as TORCH) and triton (not pure Python; its 3.6 interpreter fails under numpy >= 2.4, so
CI runs the newest and the GPU check runs the GPU image's 3.6 compiled).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
NOT_PINNED = ("torch", "triton")


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """{package: lowest version} of every `name>=version` requirement: the dependencies and every extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    found: dict[str, str] = {}
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match:
            name, version = match.group(1).lower(), match.group(2)
            if found.setdefault(name, version) != version:
                raise ValueError(f"pyproject.toml: {name} has two floors, {found[name]} and {version}")
    return found


def constraints(torch_version: str) -> list[str]:
    return [f"torch=={torch_version}"] + [f"{name}=={version}" for name, version in sorted(floors().items())
                                     if name not in NOT_PINNED]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python .ci/floors.py TORCH_VERSION (the torch the floor venv installs)")
    print("\n".join(constraints(sys.argv[1])))
