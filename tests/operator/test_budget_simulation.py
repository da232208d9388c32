"""The allocator under churn (benchmarks/budgetsim.py at a small scale): no invariant ever breaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parents[2] / "benchmarks" / "budgetsim.py"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_churning_fleet_keeps_every_invariant(seed: int) -> None:
    spec = importlib.util.spec_from_file_location("budgetsim", SIM)
    assert spec is not None and spec.loader is not None
    sim = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("budgetsim", sim)  # its dataclasses look their module up
    spec.loader.exec_module(sim)
    tally, _ = sim.run(servers=6, pgpools=8, max_pods=30, periods=40, seed=seed)
    assert tally.violations == []
    assert tally.checks > 1000
