"""spec.autoscaling at each reconcile: read the pods' clients, decide (autoscale.py), write the scale subresource.

The operator scales the way an HPA does: through the PgPool's `scale` subresource, so
`spec.replicas` always says what runs and `kubectl get pgpool` shows it. The
recommendations of the scale-down window are kept in this process (the handlers of one
PgPool take turns, and each sees the object as it was when it started, so the status
alone would lose some) and in `status.autoscaling`, which carries them over a restart.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import autoscale, budget, conditions, fleet, kube, model, render

SCALING_LIMITED = "ScalingLimited"
# Progress, not trouble: never a Warning Event.
QUIET_REASONS = ("DesiredWithinRange",)

# PgPool uid -> the recommendations of its window, as last decided in this process.
_remembered: dict[str, tuple[autoscale.Recommendation, ...]] = {}


@dataclass(frozen=True, slots=True)
class Scaled:
    pgpool: model.PgPool  # with spec.replicas as decided
    status: dict[str, Any]  # status.autoscaling
    condition: conditions.Condition


async def count_clients(addresses: Mapping[str, str], *, port: int, timeout: float) -> tuple[int | None, bool]:
    """(clients over the pods that told, whether every pod told) from each pod's GET /status."""
    if not addresses:
        return 0, True
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(name: str, ip: str) -> None:
            try:
                async with session.get(f"{fleet.pod_url(ip, port)}/status") as response:
                    if response.status == 200:
                        counts[name] = int((await response.json())["clients"])
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
                return

        await asyncio.gather(*(one(name, ip) for name, ip in sorted(addresses.items())))
    if not counts:
        return None, False
    return sum(counts.values()), len(counts) == len(addresses)


def _iso(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _epoch(text: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def history_of(status: model.AutoscalingStatus | None) -> tuple[autoscale.Recommendation, ...]:
    if status is None:
        return ()
    out = []
    for rec in status.recommendations:
        at = _epoch(rec.at)
        if at is not None:
            out.append(autoscale.Recommendation(at, rec.replicas))
    return tuple(out)


def forget(uid: str) -> None:
    """The PgPool is gone: drop its window."""
    _remembered.pop(uid, None)


def _history(pgpool: model.PgPool) -> tuple[autoscale.Recommendation, ...]:
    """What this process remembers, with what the status says (after a restart, that is all)."""
    both = {*history_of(pgpool.status.autoscaling), *_remembered.get(str(pgpool.metadata.get("uid")), ())}
    return tuple(sorted(both, key=lambda r: (r.at, r.replicas)))


async def autoscale_step(
    client: kube.KubeClient,
    pgpool: model.PgPool,
    *,
    usable: int | None,
    port: int,
    timeout: float,
    condition: Callable[..., conditions.Condition],
    now: float,
) -> Scaled:
    spec = pgpool.spec
    auto = spec.autoscaling
    assert auto is not None
    pods = await client.list(
        kube.collection_path("v1", "Pod", pgpool.namespace), label_selector=render.selector_string(pgpool.name)
    )
    clients, complete = await count_clients(fleet.running_pod_addresses(pods), port=port, timeout=timeout)
    # The count in force now: the body this reconcile started with may predate the last scale.
    scale_path = kube.object_path(f"{model.GROUP}/{model.VERSION}", "PgPool", pgpool.namespace, pgpool.name) + "/scale"
    scale = await client.get(scale_path) or {}
    current = int((scale.get("spec") or {}).get("replicas", spec.replicas))
    total = budget.spec_budget(spec.budget.max_backends, spec.budget.max_backends_percent, spec.budget.reserve, usable)
    decision = autoscale.decide(
        current=current,
        clients=clients,
        complete=complete,
        bounds=autoscale.Bounds(
            auto.min_replicas, auto.max_replicas, auto.target_clients_per_replica, auto.scale_down_stabilization_seconds
        ),
        budget_cap=autoscale.budget_replicas(total, spec.pooler.workers, spec.rollout.max_surge),
        history=_history(pgpool),
        now=now,
    )
    _remembered[str(pgpool.metadata.get("uid"))] = decision.history
    previous = pgpool.status.autoscaling
    last_scale = previous.last_scale_time if previous else None
    if decision.replicas != current:
        # As an HPA would: through the scale subresource, so the change is an ordinary spec edit.
        await client.merge_patch(scale_path, {"spec": {"replicas": decision.replicas}})
        last_scale = _iso(now)
    if decision.replicas != spec.replicas:
        pgpool = pgpool.model_copy(update={"spec": spec.model_copy(update={"replicas": decision.replicas})})
    status: dict[str, Any] = {
        "clients": clients,
        "desiredReplicas": decision.replicas,
        "recommendations": [{"at": _iso(r.at), "replicas": r.replicas} for r in decision.history],
    }
    if last_scale:
        status["lastScaleTime"] = last_scale
    if decision.limited is not None:
        cond = condition(SCALING_LIMITED, True, decision.limited, decision.message)
    else:
        cond = condition(SCALING_LIMITED, False, "DesiredWithinRange", decision.message)
    return Scaled(pgpool, status, cond)
