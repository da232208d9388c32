"""One idempotent reconcile of a PgPool: read the facts, render, apply, and report.

Called from every kopf handler (create, update, resume, timer) with the same effect
whether anything changed or not. It knows nothing of kopf: it returns the status to write
and the Events to post, and the handlers do both.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgfleet.pooler.config import ConfigError
from pgfleet.pooler.userlist import parse_userlist

from . import budget, conditions, fleet, kube, model, monitoring, render, scaling, traffic
from .apply import apply
from .control import BudgetLoops, Fleet, FleetReport, PeriodReport
from .observe import DatabaseFacts, DatabaseProbe, DatabaseTarget, DatabaseUnreachable

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(slots=True)
class Outcome:
    status: Obj
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Context:
    client: kube.KubeClient
    probe: DatabaseProbe
    pooler_image: str
    push_timeout: float = 5.0
    # One budget loop per database server: the budget and every pod's limit. The operator
    # starts them before any reconcile; only a paused PgPool is reconciled without.
    loops: BudgetLoops | None = None
    pod_http_port: int = render.HTTP_PORT  # where the operator reaches each pod's control port


class MissingSecret(Exception):
    """A Secret the PgPool names is absent or lacks a key; the message says which."""


def _secret_value(secret: Obj, key: str) -> str | None:
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


async def _read_secret(client: kube.KubeClient, namespace: str, name: str, keys: tuple[str, ...]) -> dict[str, str]:
    secret = await client.get(kube.object_path("v1", "Secret", namespace, name))
    if secret is None:
        raise MissingSecret(f"Secret {namespace}/{name} does not exist")
    values = {key: _secret_value(secret, key) for key in keys}
    missing = [key for key, value in values.items() if not value]
    if missing:
        raise MissingSecret(f"Secret {namespace}/{name} has no {', '.join(repr(k) for k in missing)}")
    return {key: str(value) for key, value in values.items()}


async def _token(client: kube.KubeClient, pgpool: model.PgPool) -> str:
    # Made once and kept: changing it would lock the operator out of running pods.
    secret = await client.get(kube.object_path("v1", "Secret", pgpool.namespace, render.token_secret_name(pgpool.name)))
    existing = _secret_value(secret, "token") if secret else None
    return existing or secrets.token_urlsafe(32)


def _status_base(pgpool: model.PgPool) -> Obj:
    return {
        "observedGeneration": pgpool.generation,
        "selector": render.selector_string(pgpool.name),
    }


def _finish(pgpool: model.PgPool, status: Obj, updates: list[conditions.Condition], events: list[Event]) -> Outcome:
    previous = [c.model_dump(by_alias=True, mode="json", exclude_none=True) for c in pgpool.status.conditions]
    for cond in updates:
        # Pods starting up is progress, not a problem worth an Event.
        quiet = ("PodsNotReady", "Paused", *traffic.QUIET_REASONS, *scaling.QUIET_REASONS)
        if cond["reason"] in quiet or not conditions.flipped_to_false(previous, cond):
            continue
        event = Event("Warning", cond["reason"], cond["message"])
        if event not in events:
            events.append(event)
    status["conditions"] = conditions.merge(previous, updates)
    return Outcome(status=status, events=events)


async def reconcile(ctx: Context, body: Obj) -> Outcome:
    pgpool = model.PgPool.model_validate(body)
    spec = pgpool.spec
    # Every condition of one reconcile carries the generation it saw and one timestamp.
    condition = functools.partial(conditions.condition, generation=pgpool.generation, at=conditions.now())
    status = _status_base(pgpool)
    events: list[Event] = []

    if spec.paused:
        # Nothing of this generation was computed: the status keeps describing the one it did.
        if pgpool.status.observed_generation is None:
            del status["observedGeneration"]
        else:
            status["observedGeneration"] = pgpool.status.observed_generation
        ready = condition(conditions.READY, False, "Paused", "spec.paused is true: children are left as they are")
        return _finish(pgpool, status, [ready], events)

    # -- credentials -------------------------------------------------------------------------
    try:
        creds = await _read_secret(
            ctx.client, pgpool.namespace, spec.database.credentials_secret, ("username", "password")
        )
        client_userlist = None
        if spec.client_auth.userlist_secret:
            text = (
                await _read_secret(ctx.client, pgpool.namespace, spec.client_auth.userlist_secret, ("userlist.txt",))
            )["userlist.txt"]
            try:
                client_userlist = parse_userlist(text, f"Secret {spec.client_auth.userlist_secret} userlist.txt")
            except ConfigError as exc:
                raise MissingSecret(str(exc)) from None
        auth_user = None
        lookup = spec.client_auth.auth_query
        if lookup is not None and lookup.user_secret:
            found = await _read_secret(ctx.client, pgpool.namespace, lookup.user_secret, ("username", "password"))
            auth_user = (found["username"], found["password"])
        server_ca = None
        if spec.tls.server_ca_secret:
            server_ca = (await _read_secret(ctx.client, pgpool.namespace, spec.tls.server_ca_secret, ("ca.crt",)))[
                "ca.crt"
            ]
        server_cert: dict[str, str] = {}
        if spec.tls.server_cert_secret:
            server_cert = await _read_secret(
                ctx.client, pgpool.namespace, spec.tls.server_cert_secret, ("tls.crt", "tls.key")
            )
    except MissingSecret as exc:
        # Without credentials nothing sensible can be rendered; leave the children as they are.
        msg = str(exc)
        return _finish(
            pgpool,
            status,
            [
                condition(conditions.READY, False, "SecretMissing", msg),
                condition(conditions.DATABASE_REACHABLE, None, "SecretMissing", msg),
            ],
            events,
        )

    # -- the database ------------------------------------------------------------------------
    # The operator reaches the database with the poolers' TLS settings (spec.tls).
    target = DatabaseTarget(
        spec.database.host,
        spec.database.port,
        spec.database.dbname,
        creds["username"],
        creds["password"],
        sslmode=spec.tls.server_sslmode.value,
        ca=server_ca,
        cert=server_cert.get("tls.crt"),
        key=server_cert.get("tls.key"),
    )
    facts: DatabaseFacts | None = None
    key = f"{pgpool.namespace}/{pgpool.name}"
    loops = ctx.loops
    if loops is None:
        raise RuntimeError("the budget loops are not running: the operator's startup makes them")
    looked = loops.report(key)
    seen_max = looked[0].max_connections if looked is not None and looked[0].observed else None
    if looked is not None and seen_max is not None:
        # The budget loop's kept connection sees the database even when it is full, where
        # a new connection of the probe's would be refused.
        period, mine = looked
        facts = DatabaseFacts(
            max_connections=seen_max, backends_in_use=mine.fleet_backends or 0, usable=period.server.usable
        )
        reachable = condition(
            conditions.DATABASE_REACHABLE,
            True,
            "Connected",
            f"max_connections={facts.max_connections}, {facts.backends_in_use} backends of the fleet, "
            f"{period.server.others} of others",
        )
    else:
        try:
            facts = await ctx.probe(target)
            reachable = condition(
                conditions.DATABASE_REACHABLE,
                True,
                "Connected",
                f"max_connections={facts.max_connections}, {facts.backends_in_use} backends of {target.user}",
            )
        except DatabaseUnreachable as exc:
            reachable = condition(conditions.DATABASE_REACHABLE, False, "Unreachable", str(exc))
    # While the database cannot be measured, the last measurement still bounds the budget.
    max_connections = facts.max_connections if facts else pgpool.status.budget.max_connections
    usable = facts.usable if facts and facts.usable is not None else pgpool.status.budget.usable

    # -- autoscaling: spec.replicas from the clients the pods report (scaling.py) ----------------
    scaled: scaling.Scaled | None = None
    if spec.autoscaling is not None:
        scaled = await scaling.autoscale_step(
            ctx.client,
            pgpool,
            usable=usable,
            port=ctx.pod_http_port,
            timeout=ctx.push_timeout,
            condition=condition,
            now=time.time(),
        )
        pgpool, spec = scaled.pgpool, scaled.pgpool.spec
        status["autoscaling"] = scaled.status
    elif pgpool.status.autoscaling is not None:
        status["autoscaling"] = None  # autoscaling turned off: its record goes

    # -- budget and rendering ---------------------------------------------------------------------
    # The budget is the loop's (allocate.py, one observation at a time); here only whether the
    # spec can feed every pod that may run at once, and what a new pod starts with.
    floors = budget.check_floors(
        replicas=spec.replicas,
        max_surge=spec.rollout.max_surge,
        max_backends=spec.budget.max_backends,
        max_backends_percent=spec.budget.max_backends_percent,
        reserve=spec.budget.reserve,
        usable=usable,
        workers=spec.pooler.workers,
    )
    token = await _token(ctx.client, pgpool)
    loops.register(_fleet(ctx, pgpool, creds["username"], token, floors), target)
    seen = loops.report(key)
    # A pod starts at its floor and the loop raises it as the database allows; no pods while
    # the budget cannot feed them; the Deployment does not grow while a running pod's limit
    # is unconfirmed (it could hold more than the loop counts it for).
    replicas_cap = None
    if floors.shortfall:
        replicas_cap = 0
    elif seen is not None and seen[1].unconfirmed:
        live = await ctx.client.get(kube.object_path("apps/v1", "Deployment", pgpool.namespace, pgpool.name))
        if live is not None:
            replicas_cap = int((live.get("spec") or {}).get("replicas") or 0)
    children = render.render(
        pgpool,
        render.Facts(
            image=ctx.pooler_image,
            username=creds["username"],
            password=creds["password"],
            token=token,
            start_limit=floors.start_limit,
            client_userlist=client_userlist,
            auth_user=auth_user,
            replicas_cap=replicas_cap,
        ),
    )

    for obj in children.present():
        await apply(ctx.client, obj)
    if children.pdb is None:
        await ctx.client.delete(kube.object_path("policy/v1", "PodDisruptionBudget", pgpool.namespace, pgpool.name))
    paused = await _pause(ctx, pgpool, token)
    monitored = await _pod_monitor(ctx, pgpool, condition)
    status["pausedPods"] = len(paused.fully_paused) if pgpool.spec.pooler.paused else 0

    # -- status ------------------------------------------------------------------------------------
    if floors.shortfall is not None:
        enforced = condition(conditions.BUDGET_ENFORCED, False, floors.shortfall.value, floors.explain())
    elif seen is not None:
        enforced = _enforced(condition, seen[0], seen[1])
    else:
        enforced = condition(
            conditions.BUDGET_ENFORCED, None, "NotObserved", "the budget loop has not looked at the database yet"
        )

    deployment = await ctx.client.get(kube.path_of(children.deployment)) or {}
    dep_status = deployment.get("status") or {}
    desired = int(children.deployment["spec"]["replicas"])
    ready_replicas = int(dep_status.get("readyReplicas") or 0)
    status["replicas"] = int(dep_status.get("replicas") or 0)
    status["readyReplicas"] = ready_replicas
    status["budget"] = {
        "maxConnections": max_connections,
        "backendsInUse": facts.backends_in_use if facts else None,
    }
    if seen is not None:
        status["budget"].update(_budget_status(seen[0], seen[1]))
        _budget_change_event(pgpool, status["budget"]["total"], events)
    if floors.shortfall is not None:
        ready = condition(conditions.READY, False, floors.shortfall.value, floors.explain())
    else:
        pods_ready = ready_replicas >= desired
        ready = condition(
            conditions.READY,
            pods_ready,
            "PodsReady" if pods_ready else "PodsNotReady",
            f"{ready_replicas}/{desired} pooler pods ready",
        )
    updates = [ready, reachable, enforced, condition(traffic.TRAFFIC_PAUSED, *traffic.describe(paused))]
    if scaled is not None:
        updates.append(scaled.condition)
    if monitored is not None:
        updates.append(monitored)
    return _finish(pgpool, status, updates, events)


async def _pod_monitor(
    ctx: Context, pgpool: model.PgPool, condition: Callable[..., conditions.Condition]
) -> conditions.Condition | None:
    """spec.monitoring.podMonitor: the PodMonitor where the cluster serves the kind (monitoring.py)."""
    discovery = await ctx.client.get(f"/apis/{monitoring.GROUP_VERSION}")
    served = any(r.get("name") == "podmonitors" for r in (discovery or {}).get("resources") or [])
    path = kube.object_path(monitoring.GROUP_VERSION, "PodMonitor", pgpool.namespace, pgpool.name)
    if not pgpool.spec.monitoring.pod_monitor:
        if served:
            await ctx.client.delete(path)  # turned off: ours goes (nothing if there is none)
        return None
    if not served:
        return condition(
            monitoring.MONITORING,
            False,
            "PodMonitorUnavailable",
            "spec.monitoring.podMonitor is true, but this cluster does not serve monitoring.coreos.com/v1 "
            "PodMonitors: install the Prometheus Operator's CRDs (the pods' /metrics on port http stays scrapable)",
        )
    await apply(ctx.client, monitoring.render_pod_monitor(pgpool))
    return condition(
        monitoring.MONITORING, True, "PodMonitorApplied", f"PodMonitor {pgpool.name} scrapes the pods' /metrics"
    )


async def _pause(ctx: Context, pgpool: model.PgPool, token: str) -> traffic.PauseReport:
    """spec.pooler.paused to every running pod (see traffic.py).

    Called after the ConfigMap is applied: a pod that starts from now on reads the new state
    there; the ones listed here get it live. The budget loop's pushes of the same state share
    the lock, so an older spec's push never lands after this one.
    """
    pods = await ctx.client.list(
        kube.collection_path("v1", "Pod", pgpool.namespace), label_selector=render.selector_string(pgpool.name)
    )
    lock = ctx.loops.pause_lock(f"{pgpool.namespace}/{pgpool.name}") if ctx.loops is not None else asyncio.Lock()
    async with lock:
        return await traffic.push_pause(
            fleet.running_pod_addresses(pods),
            pgpool.spec.pooler.paused,
            token,
            port=ctx.pod_http_port,
            timeout=ctx.push_timeout,
        )


# -- the budget loop's side ------------------------------------------------------------------------


def budget_report(loops: BudgetLoops, body: Obj) -> Outcome | None:
    """status.budget, BudgetEnforced, TrafficPaused and pausedPods from the loop's last period,
    between full reconciles.

    None when there is nothing new to say: no report yet, or the status already has it.
    Nothing else of the status is touched (observedGeneration stays the reconcile's).
    """
    pgpool = model.PgPool.model_validate(body)
    if pgpool.spec.paused or pgpool.status.observed_generation is None:
        return None
    looked = loops.report(f"{pgpool.namespace}/{pgpool.name}")
    if looked is None:
        return None
    period, report = looked
    budget_now = _budget_status(period, report)
    condition = functools.partial(
        conditions.condition, generation=pgpool.status.observed_generation, at=conditions.now()
    )
    updates = [_enforced(condition, period, report)]
    status: Obj = {"budget": budget_now}
    pause = report.pause
    # The pods' pause as the loop saw them, once the reconcile has taken the spec's generation
    # and when the loop pushed the pause the spec asks for now (not one from before a change).
    if (
        pause is not None
        and pgpool.generation == pgpool.status.observed_generation
        and pause.wanted == pgpool.spec.pooler.paused
    ):
        updates.append(condition(traffic.TRAFFIC_PAUSED, *traffic.describe(pause)))
        status["pausedPods"] = len(pause.fully_paused) if pause.wanted else 0
    # Only a change is written (observedAt alone moves with every full reconcile).
    written = pgpool.status.budget.model_dump(by_alias=True, mode="json")
    same_budget = all(written.get(k) == v for k, v in budget_now.items() if k != "observedAt")
    same_paused = status.get("pausedPods", pgpool.status.paused_pods) == pgpool.status.paused_pods
    if same_budget and same_paused and all(_unchanged(pgpool, cond) for cond in updates):
        return None
    events: list[Event] = []
    _budget_change_event(pgpool, budget_now["total"], events)
    return _finish(pgpool, status, updates, events)


def _unchanged(pgpool: model.PgPool, cond: conditions.Condition) -> bool:
    """Whether the status already says what `cond` says (its time and generation aside)."""
    previous = next((c for c in pgpool.status.conditions if c.type == cond["type"]), None)
    return previous is not None and (previous.status.value, previous.reason, previous.message) == (
        cond["status"],
        cond["reason"],
        cond["message"],
    )


def _fleet(ctx: Context, pgpool: model.PgPool, role: str, token: str, floors: budget.Floors) -> Fleet:
    """The PgPool as its server's budget loop sees it: spec, and how to find its pods."""
    spec = pgpool.spec
    client, namespace, selector, port = (
        ctx.client,
        pgpool.namespace,
        render.selector_string(pgpool.name),
        ctx.pod_http_port,
    )

    async def pods() -> dict[str, str]:
        found = await client.list(kube.collection_path("v1", "Pod", namespace), label_selector=selector)
        # A terminating pod still holds what it drains: it counts until its containers exit.
        running = fleet.running_pod_addresses(found, terminating=True)
        return {name: fleet.pod_url(ip, port) for name, ip in running.items()}

    return Fleet(
        name=f"{pgpool.namespace}/{pgpool.name}",
        token=token,
        pods=pods,
        role=role,
        database=spec.database.dbname,
        # A budget too small to feed every pod's workers gives nothing (the Deployment is at 0).
        max_backends=0 if floors.shortfall else spec.budget.max_backends,
        max_backends_percent=spec.budget.max_backends_percent,
        reserve=spec.budget.reserve,
        weight=spec.budget.weight,
        workers=spec.pooler.workers,
        surge=spec.rollout.max_surge,
        paused=spec.pooler.paused,
    )


def _budget_status(period: PeriodReport, report: FleetReport) -> Obj:
    limits = list(report.limits.values())
    out: Obj = {
        "total": report.budget.budget,
        "fleetBackends": report.fleet_backends,
        "waitingClients": report.budget.waiting,
        "perPodMin": min(limits) if limits else None,
        "perPodMax": max(limits) if limits else None,
        "clients": sum(pod.clients for pod in report.pods.values() if pod.reachable) if report.pods else None,
        "observedAt": _iso(period.at),
    }
    if period.observed:
        out.update(usable=period.server.usable, others=period.server.others, headroom=period.server.headroom)
    return out


def _iso(at: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _enforced(condition: Any, period: PeriodReport, report: FleetReport) -> Any:
    from .allocate import Reason

    got = report.budget
    held = report.fleet_backends if report.fleet_backends is not None else got.held
    if held > got.budget:
        return condition(
            conditions.BUDGET_ENFORCED,
            False,
            Reason.OVERCOMMITTED.value,
            f"the fleet holds {held} backends against a budget of {got.budget}; pods give back as transactions end",
        )
    if report.unconfirmed:
        detail = "; ".join(f"{pod}: {why}" for pod, why in sorted(report.unconfirmed.items()))
        return condition(
            conditions.BUDGET_ENFORCED,
            False,
            "Unconfirmed",
            f"pods count at their last confirmed limit until they answer: {detail}",
        )
    if not period.observed:
        return condition(
            conditions.BUDGET_ENFORCED,
            False,
            Reason.UNOBSERVED.value,
            f"the database cannot be observed ({period.error}); limits may go down, never up",
        )
    if Reason.SQUEEZED in got.reasons:
        message = (
            f"others hold {period.server.others} backends: the budget is {got.budget}, "
            f"below the {got.wanted} the spec allows"
        )
        # Its flip to False is posted as a Warning Event (see _finish).
        return condition(conditions.BUDGET_ENFORCED, False, Reason.SQUEEZED.value, message)
    return condition(
        conditions.BUDGET_ENFORCED,
        True,
        "Allocated",
        f"{held} backends held within a budget of {got.budget}; pod limits {sorted(report.limits.values())}",
    )


def _budget_change_event(pgpool: model.PgPool, total: int, events: list[Event]) -> None:
    """An Event when the budget moves by more than a tenth (or by at least 2 on small budgets)."""
    before = pgpool.status.budget.total
    if before is None or abs(total - before) < max(2, before // 10):
        return
    events.append(Event("Normal", "BudgetChanged", f"budget {before} -> {total} backends"))
