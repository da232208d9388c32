"""The budget split: the pods that can exist at once never hold more backends than the budget."""

from __future__ import annotations

import pytest
from pgfleet.operator.budget import Shortfall, allocate, fleet_budget


@pytest.mark.parametrize("max_surge", [0, 1, 2, 5])
@pytest.mark.parametrize("max_backends", [21, 40, 97, 500])
@pytest.mark.parametrize("reserve", [0, 3])
@pytest.mark.parametrize("workers", [1, 2, 4, 16])
def test_most_pods_times_pool_size_fits_the_budget(
    max_surge: int, max_backends: int, reserve: int, workers: int
) -> None:
    for replicas in range(1, 21):
        alloc = allocate(
            replicas=replicas, max_surge=max_surge, max_backends=max_backends, reserve=reserve, workers=workers
        )
        assert alloc.pods == replicas + max_surge
        assert alloc.total == max_backends - reserve
        assert alloc.pods * alloc.per_pod <= max_backends - reserve
        if alloc.shortfall is None:
            # every worker of every pod gets at least one backend ...
            assert alloc.per_pod >= workers
            # ... and no backend is wasted: one more per pod would break the budget.
            assert alloc.pods * (alloc.per_pod + 1) > max_backends - reserve
        else:
            assert alloc.shortfall is Shortfall.BUDGET_TOO_SMALL and alloc.per_pod == 0
            assert alloc.pods * workers > max_backends - reserve  # only when it really does not fit


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


# (replicas, maxSurge, maxBackends, reserve, workers) -> per_pod; the budget split is the same,
# but a pod's pool must be 0 or at least one backend per worker.
WORKER_SPLITS = [
    (2, 1, 12, 0, 4, 4),  # exactly one backend per worker
    (2, 1, 14, 0, 4, 4),  # 14 // 3 = 4: the remainder stays unused
    (3, 1, 40, 4, 4, 9),  # more than one per worker: the pooler splits 9 as 3, 2, 2, 2
    (3, 1, 40, 4, 9, 9),
]


@pytest.mark.parametrize(("replicas", "max_surge", "max_backends", "reserve", "workers", "per_pod"), WORKER_SPLITS)
def test_one_backend_per_worker_is_enough(
    replicas: int, max_surge: int, max_backends: int, reserve: int, workers: int, per_pod: int
) -> None:
    alloc = allocate(
        replicas=replicas, max_surge=max_surge, max_backends=max_backends, reserve=reserve, workers=workers
    )
    assert alloc.shortfall is None and alloc.per_pod == per_pod
    assert alloc.explain() == f"{alloc.pods} pods x {per_pod} backends <= budget {max_backends - reserve}"


def test_fewer_backends_per_pod_than_workers_is_a_shortfall() -> None:
    # 11 // 3 = 3 backends per pod would leave one of 4 workers none: pools stay at 0 instead.
    alloc = allocate(replicas=2, max_surge=1, max_backends=11, workers=4)
    assert alloc.shortfall is Shortfall.BUDGET_TOO_SMALL and alloc.per_pod == 0 and alloc.used_at_most == 0
    assert alloc.explain() == (
        "a budget of 11 backends cannot give each of 3 pods (replicas + rollout.maxSurge) "
        "one backend per worker (4); pools stay at 0"
    )


def test_percentage_budget_too_small_for_the_workers() -> None:
    alloc = allocate(
        replicas=4, max_surge=1, max_backends=None, max_backends_percent=10, max_connections=100, workers=3
    )
    assert (alloc.total, alloc.pods, alloc.per_pod) == (10, 5, 0)  # 10 // 5 = 2 < 3 workers
    assert alloc.shortfall is Shortfall.BUDGET_TOO_SMALL
    assert "one backend per worker (3)" in alloc.explain()


@pytest.mark.parametrize(("max_backends", "workers", "per_pod"), [(10, 1, 10), (10, 4, 10), (3, 4, 0)])
def test_scaled_to_zero_keeps_a_pool_the_workers_accept(max_backends: int, workers: int, per_pod: int) -> None:
    # No pod runs, so nothing is short; the ConfigMap's pool must still be 0 or >= workers.
    alloc = allocate(replicas=0, max_surge=0, max_backends=max_backends, workers=workers)
    assert alloc.shortfall is None and alloc.per_pod == per_pod and alloc.used_at_most == 0
