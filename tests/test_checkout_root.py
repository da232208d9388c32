"""The checkout root is a place people stand: `operator/` there must not hide the standard library.

The folder is installed as `pgfleet.operator` and has no `__init__.py`, so a Python started
in the root (whose sys.path begins with it) sees at most a namespace portion named
`operator`, and the standard library's `operator` module wins over it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_in_root(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_folder_is_no_regular_package() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()


def test_standard_library_wins_in_the_root() -> None:
    done = _run_in_root("-c", "import collections, operator; print(operator.__file__)")
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(str(REPO)), done.stdout


def test_python_m_pytest_in_the_root() -> None:
    done = _run_in_root("-m", "pytest", "--version")
    assert done.returncode == 0, done.stderr
    assert "pytest" in done.stdout + done.stderr


def test_python_m_pgfleet_operator_in_the_root() -> None:
    done = _run_in_root("-m", "pgfleet.operator", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: pgfleet-operator" in done.stdout
    # The import name is the installed package's, not the folder's.
    where = _run_in_root("-c", "import pgfleet.operator.cli as c; print(c.__name__)")
    assert where.stdout.strip() == "pgfleet.operator.cli", where.stderr
