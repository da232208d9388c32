"""spec.autoscaling: how many pooler pods the clients call for, as a pure decision (no I/O).

The same rules as a HorizontalPodAutoscaler on one metric, with the budget as a bound:
- the recommendation is ceil(clients / targetClientsPerReplica), kept within
  [minReplicas, maxReplicas];
- never more pods than the budget can give a per-pod floor: every pod that can exist at
  once (replicas + rollout.maxSurge) needs `workers` backends of its own, so the fleet
  stops at total // workers - maxSurge replicas and says so (ScalingLimited=BudgetFloor);
- up at once; down only to the highest recommendation of the last
  scaleDownStabilizationSeconds, so a crowd that comes and goes does not flap the fleet;
- when some pod did not say how many clients it has, the count is a floor: up only.

Scaling never moves the budget: more pods share the same backends (smaller pools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Recommendation:
    at: float  # seconds since the epoch
    replicas: int


@dataclass(frozen=True, slots=True)
class Bounds:
    min_replicas: int
    max_replicas: int
    target_clients_per_replica: int
    stabilization_seconds: float


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int  # what spec.replicas should be now
    wanted: int  # ceil(clients / target), before any bound
    recommendation: int  # `wanted` within the bounds and the budget
    limited: str | None  # None, "TooFewReplicas", "TooManyReplicas" or "BudgetFloor"
    message: str
    history: tuple[Recommendation, ...]  # the recommendations of the window, this one included


def budget_replicas(total: int | None, workers: int, max_surge: int) -> int | None:
    """Most replicas whose pods (with the rollout's surge) each get `workers` backends; None: unknown."""
    if total is None:
        return None
    return max(0, total // max(1, workers) - max_surge)


def decide(
    *,
    current: int,
    clients: int | None,
    complete: bool,
    bounds: Bounds,
    budget_cap: int | None,
    history: tuple[Recommendation, ...],
    now: float,
) -> Decision:
    """The replica count for now. `complete`: every running pod told its clients."""
    # The window starts when the autoscaler first looks (autoscaling just turned on, its record
    # lost): without any history, the current count stands for the past, so nothing shrinks at once.
    if history:
        window = [r for r in history if now - r.at < bounds.stabilization_seconds]
    else:
        window = [Recommendation(now, current)]
    if clients is None:
        # Nobody told: hold still, and let the window age.
        return Decision(current, current, current, None, "no pod reported its clients yet", tuple(window))
    wanted = math.ceil(clients / bounds.target_clients_per_replica)
    recommendation, limited = wanted, None
    if recommendation > bounds.max_replicas:
        recommendation, limited = bounds.max_replicas, "TooManyReplicas"
    elif recommendation < bounds.min_replicas:
        recommendation, limited = bounds.min_replicas, "TooFewReplicas"
    if budget_cap is not None and recommendation > budget_cap:
        recommendation, limited = budget_cap, "BudgetFloor"
    if not complete:
        recommendation = max(recommendation, min(current, budget_cap if budget_cap is not None else current))
    window = [*window, Recommendation(now, recommendation)]
    # Up at once; down only as far as the highest recommendation of the window.
    replicas = recommendation if recommendation >= current else min(current, max(r.replicas for r in window))
    if budget_cap is not None:
        replicas = min(replicas, budget_cap)  # a smaller budget applies at once, window or not
    message = _explain(clients, bounds, wanted, recommendation, replicas, current, limited, budget_cap)
    return Decision(replicas, wanted, recommendation, limited, message, tuple(window))


def _explain(
    clients: int,
    bounds: Bounds,
    wanted: int,
    recommendation: int,
    replicas: int,
    current: int,
    limited: str | None,
    budget_cap: int | None,
) -> str:
    base = f"{clients} clients at {bounds.target_clients_per_replica} per replica want {wanted}"
    if limited == "BudgetFloor":
        base += f"; the budget gives each pod its floor for at most {budget_cap} replicas"
    elif limited == "TooManyReplicas":
        base += f"; maxReplicas is {bounds.max_replicas}"
    elif limited == "TooFewReplicas":
        base += f"; minReplicas is {bounds.min_replicas}"
    if replicas < current:
        return f"{base}: down from {current} to {replicas}"
    if replicas > current:
        return f"{base}: up from {current} to {replicas}"
    if recommendation < current:
        return f"{base}: {current} kept for the scale-down window ({bounds.stabilization_seconds:g} s)"
    return f"{base}: {replicas}"
