"""docs/design.md stays the contract: every public name in trd_fast.__all__ has its own section there."""

import re
from pathlib import Path

import trd_fast

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
SECTION = re.compile(r"^### `([A-Za-z_][A-Za-z0-9_]*)`", re.MULTILINE)  # a section: ### `name`


def documented_names() -> set[str]:
    return set(SECTION.findall(DESIGN.read_text(encoding="utf-8")))


def test_every_public_name_has_a_section():
    missing = sorted(set(trd_fast.__all__) - documented_names())
    assert not missing, f"public names without a '### `name`' section in docs/design.md: {missing}"

