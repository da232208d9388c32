"""The budget split: the pods that can exist at once never hold more backends than the budget."""

from __future__ import annotations

import pytest
from pgfleet.operator.budget import Shortfall, allocate, fleet_budget


@pytest.mark.parametrize("max_surge", [0, 1, 2, 5])
@pytest.mark.parametrize("max_backends", [21, 40, 97, 500])
@pytest.mark.parametrize("reserve", [0, 3])
def test_most_pods_times_pool_size_fits_the_budget(max_surge: int, max_backends: int, reserve: int) -> None:
    for replicas in range(1, 21):
        alloc = allocate(replicas=replicas, max_surge=max_surge, max_backends=max_backends, reserve=reserve)
        assert alloc.pods == replicas + max_surge
        assert alloc.total == max_backends - reserve
        assert alloc.pods * alloc.per_pod <= max_backends - reserve
        if alloc.shortfall is None:
            assert alloc.per_pod >= 1
            # ... and no backend is wasted: one more per pod would break the budget.
            assert alloc.pods * (alloc.per_pod + 1) > max_backends - reserve
        else:
            assert alloc.shortfall is Shortfall.BUDGET_TOO_SMALL and alloc.per_pod == 0


def test_percentage_of_max_connections() -> None:
    alloc = allocate(
        replicas=4, max_surge=1, max_backends=None, max_backends_percent=50, reserve=5, max_connections=100
    )
    assert (alloc.total, alloc.per_pod) == (45, 9)


@pytest.mark.parametrize(
    ("absolute", "percent", "max_connections", "total"),
    [(30, 50, 100, 30), (80, 50, 100, 50), (None, 10, 1000, 100), (25, None, None, 25)],
)
def test_the_smaller_form_wins(
    absolute: int | None, percent: int | None, max_connections: int | None, total: int
) -> None:
    assert fleet_budget(absolute, percent, 0, max_connections) == total


def test_unmeasured_percentage_gives_nothing() -> None:
    # Even with an absolute budget too: the share could turn out smaller once measured.
    for absolute in (None, 50):
        alloc = allocate(replicas=2, max_surge=1, max_backends=absolute, max_backends_percent=50)
        assert alloc.shortfall is Shortfall.CAPACITY_UNKNOWN and alloc.per_pod == 0
        assert "not been measured" in alloc.explain()


def test_too_small_says_why() -> None:
    alloc = allocate(replicas=9, max_surge=2, max_backends=12, reserve=2)
    assert alloc.shortfall is Shortfall.BUDGET_TOO_SMALL
    assert alloc.explain() == (
        "a budget of 10 backends cannot give each of 11 pods (replicas + rollout.maxSurge) one backend; pools stay at 0"
    )


def test_reserve_larger_than_measured_share() -> None:
    alloc = allocate(replicas=1, max_surge=1, max_backends=None, max_backends_percent=1, reserve=5, max_connections=100)
    assert alloc.total == 0 and alloc.per_pod == 0 and alloc.shortfall is Shortfall.BUDGET_TOO_SMALL


def test_scaled_to_zero_holds_nothing() -> None:
    alloc = allocate(replicas=0, max_surge=0, max_backends=10, reserve=0)
    assert alloc.used_at_most == 0 and alloc.shortfall is None
