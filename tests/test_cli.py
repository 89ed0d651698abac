"""`trd-fast`: every command is listed, and a driver (with transformers and the models' code) is imported only
when its own command is given."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from trd_fast.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("loaded:", sorted(m for m in ("transformers", "trd_fast.drivers.demo", "trd_fast.drivers.pretrain")
                        if m in sys.modules))
"""


def run_cli(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=list(argv))], capture_output=True, text=True,
                          check=True)
    return done.stdout


def test_help_lists_every_command_without_importing_a_driver():
    out = run_cli("--help")
    assert all(name in out for name in ("loss-demo", "train", "eval", "pretrain", "demo"))
    assert "loaded: []" in out


def test_a_driver_command_gets_its_own_arguments():
    out = run_cli("demo", "--help")
    assert "--curve-every" in out and "loaded: ['transformers', 'trd_fast.drivers.demo']" in out
