"""Status conditions keep Kubernetes' conventions."""

from __future__ import annotations

import pytest
from pgfleet.operator import conditions as c
from pgfleet.operator.settings import OperatorSettings


def test_transition_time_moves_only_when_status_flips() -> None:
    first = [c.condition(c.READY, False, "PodsNotReady", "0/2", generation=1, at="T1")]
    same = c.merge(first, [c.condition(c.READY, False, "PodsNotReady", "1/2", generation=2, at="T2")])
    assert same == [
        {"type": "Ready", "status": "False", "reason": "PodsNotReady", "message": "1/2",
         "lastTransitionTime": "T1", "observedGeneration": 2}
    ]  # fmt: skip
    flipped = c.merge(same, [c.condition(c.READY, True, "PodsReady", "2/2", generation=2, at="T3")])
    assert flipped[0]["lastTransitionTime"] == "T3" and flipped[0]["status"] == "True"


def test_conditions_keep_a_stable_order() -> None:
    merged = c.merge(
        [],
        [
            c.condition(c.BUDGET_ENFORCED, True, "Allocated", "", generation=1, at="T"),
            c.condition(c.READY, None, "Unknown", "", generation=1, at="T"),
            c.condition(c.DATABASE_REACHABLE, True, "Connected", "", generation=1, at="T"),
        ],
    )
    assert [x["type"] for x in merged] == ["Ready", "DatabaseReachable", "BudgetEnforced"]
    assert merged[0]["status"] == "Unknown"


def test_one_event_per_new_problem() -> None:
    problem = c.condition(c.DATABASE_REACHABLE, False, "Unreachable", "x", generation=1, at="T")
    assert c.flipped_to_false([], problem)
    assert not c.flipped_to_false([problem], problem)
    other = c.condition(c.DATABASE_REACHABLE, False, "SecretMissing", "x", generation=1, at="T")
    assert c.flipped_to_false([problem], other)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFLEET_RECONCILE_INTERVAL", "2.5")
    monkeypatch.setenv("PGFLEET_POOLER_IMAGE", "reg/pgfleet:7")
    settings = OperatorSettings.from_env()
    assert settings.reconcile_interval == 2.5 and settings.pooler_image == "reg/pgfleet:7"
    monkeypatch.setenv("PGFLEET_PROBE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PGFLEET_PROBE_TIMEOUT='soon' is not a number"):
        OperatorSettings.from_env()
