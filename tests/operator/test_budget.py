"""Whether the spec's budget can feed every pod's floor (the budget itself is the loop's: test_allocate.py)."""

from __future__ import annotations

import pytest
from pgfleet.operator.allocate import FleetSpec, ServerFacts, allocate_server
from pgfleet.operator.budget import Shortfall, check_floors, spec_budget


@pytest.mark.parametrize("max_surge", [0, 1, 2, 5])
@pytest.mark.parametrize("max_backends", [21, 40, 97, 500])
@pytest.mark.parametrize("reserve", [0, 3])
@pytest.mark.parametrize("workers", [1, 2, 4, 16])
def test_pods_are_fed_exactly_when_every_floor_fits(
    max_surge: int, max_backends: int, reserve: int, workers: int
) -> None:
    for replicas in range(1, 21):
        floors = check_floors(
            replicas=replicas, max_surge=max_surge, max_backends=max_backends, reserve=reserve, workers=workers
        )
        assert floors.pods == replicas + max_surge and floors.wanted == max_backends - reserve
        fits = floors.pods * workers <= max_backends - reserve
        assert (floors.shortfall is None) == fits
        assert floors.start_limit == (workers if fits else 0)
        if not fits:
            assert floors.shortfall is Shortfall.BUDGET_TOO_SMALL


def test_the_same_budget_as_the_loop() -> None:
    """The spec's budget here is the loop's cap: a share of the usable backends, less the reserve."""
    assert spec_budget(None, 50, 5, usable=97) == 43  # 97 * 50 // 100 - 5
    loop = allocate_server(
        ServerFacts(max_connections=100, others=0, observer=0),
        [FleetSpec("f", max_backends_percent=50, reserve=5)],
    )
    assert loop.fleets["f"].wanted == 43


@pytest.mark.parametrize(
    ("absolute", "percent", "usable", "total"),
    [(30, 50, 100, 30), (80, 50, 100, 50), (None, 10, 1000, 100), (25, None, None, 25), (None, None, 40, 40)],
)
def test_the_smaller_form_wins(absolute: int | None, percent: int | None, usable: int | None, total: int) -> None:
    assert spec_budget(absolute, percent, 0, usable) == total


def test_an_unmeasured_share_feeds_no_pod() -> None:
    for absolute in (None, 1000):
        floors = check_floors(replicas=2, max_surge=1, max_backends=absolute, max_backends_percent=50)
        assert floors.shortfall is Shortfall.CAPACITY_UNKNOWN and floors.start_limit == 0
        assert "not been measured" in floors.explain()


def test_too_small_says_why() -> None:
    floors = check_floors(replicas=5, max_surge=1, max_backends=4)
    assert floors.shortfall is Shortfall.BUDGET_TOO_SMALL
    assert floors.explain() == (
        "a budget of 4 backends cannot give each of 6 pods (replicas + rollout.maxSurge) one backend; no pods"
    )
    workers = check_floors(replicas=5, max_surge=0, max_backends=10, workers=3)
    assert "one backend per worker (3)" in workers.explain() and workers.start_limit == 0


def test_a_reserve_larger_than_the_measured_share() -> None:
    floors = check_floors(replicas=1, max_surge=0, max_backends=None, max_backends_percent=10, reserve=20, usable=100)
    assert floors.wanted == 0 and floors.shortfall is Shortfall.BUDGET_TOO_SMALL


def test_scaled_to_zero_is_no_shortfall() -> None:
    floors = check_floors(replicas=0, max_surge=0, max_backends=3, workers=4)
    assert floors.shortfall is None and floors.start_limit == 4  # a pod that starts later starts at its floor
