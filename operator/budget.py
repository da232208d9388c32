"""The backend budget: how many PostgreSQL backends a fleet may hold, and each pod's share.

The invariant this module exists for: the backends a fleet holds never exceed its budget,
also while a rollout surges extra pods. Each pod's pool is capped at `per_pod`, and at
most `replicas + maxSurge` pods run at once, so `pods * per_pod <= total` is enough.
A pooler with several workers splits its pool among them and refuses a nonzero pool
below its worker count, so `per_pod` is either 0 or at least `workers`.
Pure arithmetic: no Kubernetes, no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Shortfall(str, Enum):
    """Why a budget cannot be honoured as the user asked; the value is the condition reason."""

    CAPACITY_UNKNOWN = "CapacityUnknown"
    BUDGET_TOO_SMALL = "BudgetTooSmall"


@dataclass(frozen=True, slots=True)
class Allocation:
    total: int  # backends the fleet may hold, reserve already taken off
    pods: int  # most pooler pods that can exist at once
    per_pod: int  # pool size of each pod: 0, or at least `workers`
    shortfall: Shortfall | None = None
    workers: int = 1  # pooler processes per pod, each needing a backend of the pod's pool

    @property
    def used_at_most(self) -> int:
        return self.pods * self.per_pod

    def explain(self) -> str:
        if self.shortfall is Shortfall.CAPACITY_UNKNOWN:
            return "the budget is a share of max_connections, which has not been measured yet; pools stay at 0"
        if self.shortfall is Shortfall.BUDGET_TOO_SMALL:
            if self.workers > 1:
                return (
                    f"a budget of {self.total} backends cannot give each of {self.pods} pods "
                    f"(replicas + rollout.maxSurge) one backend per worker ({self.workers}); pools stay at 0"
                )
            return (
                f"a budget of {self.total} backends cannot give each of {self.pods} pods "
                "(replicas + rollout.maxSurge) one backend; pools stay at 0"
            )
        return f"{self.pods} pods x {self.per_pod} backends <= budget {self.total}"


def fleet_budget(
    max_backends: int | None, max_backends_percent: int | None, reserve: int, max_connections: int | None
) -> int | None:
    """Backends the whole fleet may hold, or None while a percentage cannot be resolved."""
    limits = []
    if max_backends is not None:
        limits.append(max_backends)
    if max_backends_percent is not None:
        if max_connections is None:
            # The smaller form wins, so an absolute budget alone is not safe to use either:
            # the share could be smaller once measured.
            return None
        limits.append(max_connections * max_backends_percent // 100)
    if not limits:
        return None
    return max(0, min(limits) - reserve)


def most_pods(replicas: int, max_surge: int) -> int:
    """Pods a Deployment may run at once during a rolling update."""
    return replicas + max_surge


def allocate(
    *,
    replicas: int,
    max_surge: int,
    max_backends: int | None,
    max_backends_percent: int | None = None,
    reserve: int = 0,
    max_connections: int | None = None,
    workers: int = 1,
) -> Allocation:
    pods = most_pods(replicas, max_surge)
    total = fleet_budget(max_backends, max_backends_percent, reserve, max_connections)
    if total is None:
        return Allocation(total=0, pods=pods, per_pod=0, shortfall=Shortfall.CAPACITY_UNKNOWN, workers=workers)
    if pods == 0:
        # No pod runs, so none holds anything; the ConfigMap still gets a pool the pooler accepts.
        return Allocation(total=total, pods=0, per_pod=total if total >= workers else 0, workers=workers)
    per_pod = total // pods
    if per_pod < workers:
        # Each worker gets a share of the pod's pool: one below `workers` would leave a worker none.
        return Allocation(total=total, pods=pods, per_pod=0, shortfall=Shortfall.BUDGET_TOO_SMALL, workers=workers)
    return Allocation(total=total, pods=pods, per_pod=per_pod, workers=workers)
