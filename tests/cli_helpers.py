"""Helpers the command-line tests share (tests/test_cli.py, test_bad_cli.py, test_output.py).

``run_cli`` runs ``fxindex._cli.main`` in-process; ``one_line_error`` and
``assert_one_line_error`` check the error contract (status 2, nothing on
stdout, one ``fxindex: error:`` line on stderr, no traceback);
``subprocess_env`` puts this checkout first on the path for ``python -m
fxindex``. The ``user_module`` fixture lives in conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fxindex
from fxindex import _cli as cli

# The checkout (or install) the tests import, so the subprocesses run the same code.
PACKAGE_ROOT = str(Path(fxindex.__file__).resolve().parent.parent)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``fxindex._cli.main(argv)``; return (status, stdout, stderr)."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, out: str, err: str) -> str:
    """Check the error contract: status 2, nothing on stdout, one stderr line, no traceback; return the line."""
    assert status == 2, (status, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxindex: error: ")
    return lines[0]


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the command line and check the error contract; return the error line."""
    return assert_one_line_error(*run_cli(capsys, *argv))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m fxindex``: this checkout first on the path, then ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env
