"""Whether a PgPool's budget can feed its pods at all: the check made before rendering.

The budget itself (what a fleet may hold now, each pod's limit) is the budget loop's, from
one observation of the server at a time (allocate.py). What is left here is the question
no observation changes: can the spec's budget (`allocate.spec_cap`, the same formula the
loop uses) give every pod that may run at once (replicas + maxSurge) its floor, one backend
per worker? When it cannot, the Deployment is held at 0 pods and new pods start with a pool
of 0: a pod that cannot serve is worse than none, since its clients would only queue.
Pure arithmetic: no Kubernetes, no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .allocate import FleetSpec, spec_cap


class Shortfall(str, Enum):
    """Why a budget cannot be honoured as the user asked; the value is the condition reason."""

    CAPACITY_UNKNOWN = "CapacityUnknown"
    BUDGET_TOO_SMALL = "BudgetTooSmall"


@dataclass(frozen=True, slots=True)
class Floors:
    """The spec's budget against the floors of the pods that may run at once."""

    wanted: int | None  # the spec's budget (reserve taken off); None: a share of a server not yet measured
    pods: int  # replicas + maxSurge
    workers: int  # each pod's floor
    shortfall: Shortfall | None = None

    @property
    def start_limit(self) -> int:
        """The pool a new pod starts with (the ConfigMap's): its floor, or 0 when pods cannot be fed."""
        return 0 if self.shortfall else self.workers

    def explain(self) -> str:
        if self.shortfall is Shortfall.CAPACITY_UNKNOWN:
            return "the budget is a share of the server's usable backends, which have not been measured yet; no pods"
        per = f"one backend per worker ({self.workers})" if self.workers > 1 else "one backend"
        if self.shortfall is Shortfall.BUDGET_TOO_SMALL:
            return (
                f"a budget of {self.wanted} backends cannot give each of {self.pods} pods "
                f"(replicas + rollout.maxSurge) {per}; no pods"
            )
        return f"a budget of {self.wanted} backends gives each of {self.pods} pods at least {per}"


def spec_budget(
    max_backends: int | None, max_backends_percent: int | None, reserve: int, usable: int | None
) -> int | None:
    """The most the spec lets the fleet hold (reserve taken off); None while a share cannot be resolved."""
    if usable is None:
        if max_backends_percent is not None or max_backends is None:
            # The smaller form wins, so an absolute budget alone is not safe to use either:
            # the share could be smaller once measured.
            return None
        usable = max_backends  # not measured yet: only the spec's own number bounds it
    fleet = FleetSpec(name="", max_backends=max_backends, max_backends_percent=max_backends_percent, reserve=reserve)
    return spec_cap(fleet, usable)


def check_floors(
    *,
    replicas: int,
    max_surge: int,
    max_backends: int | None,
    max_backends_percent: int | None = None,
    reserve: int = 0,
    usable: int | None = None,
    workers: int = 1,
) -> Floors:
    """`usable`: the server's usable backends as last measured (None: never)."""
    pods = replicas + max_surge
    floor = max(1, workers)
    wanted = spec_budget(max_backends, max_backends_percent, reserve, usable)
    if wanted is None:
        return Floors(wanted=None, pods=pods, workers=floor, shortfall=Shortfall.CAPACITY_UNKNOWN)
    if pods and wanted < pods * floor:
        return Floors(wanted=wanted, pods=pods, workers=floor, shortfall=Shortfall.BUDGET_TOO_SMALL)
    return Floors(wanted=wanted, pods=pods, workers=floor)
