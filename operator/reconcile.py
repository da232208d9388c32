"""One idempotent reconcile of a PgPool: read the facts, render, apply, and report.

Called from every kopf handler (create, update, resume, timer) with the same effect
whether anything changed or not. It knows nothing of kopf: it returns the status to write
and the Events to post, and the handlers do both.
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
from dataclasses import dataclass, field
from typing import Any

from pgfleet.pooler.config import ConfigError
from pgfleet.pooler.userlist import parse_userlist

from . import budget, conditions, fleet, kube, model, render
from .apply import apply
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
        if cond["reason"] in ("PodsNotReady", "Paused") or not conditions.flipped_to_false(previous, cond):
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
    target = DatabaseTarget(
        spec.database.host, spec.database.port, spec.database.dbname, creds["username"], creds["password"]
    )
    facts: DatabaseFacts | None = None
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

    # -- budget and rendering ---------------------------------------------------------------------
    allocation = budget.allocate(
        replicas=spec.replicas,
        max_surge=spec.rollout.max_surge,
        max_backends=spec.budget.max_backends,
        max_backends_percent=spec.budget.max_backends_percent,
        reserve=spec.budget.reserve,
        max_connections=max_connections,
        workers=spec.pooler.workers,
    )
    token = await _token(ctx.client, pgpool)
    children = render.render(
        pgpool,
        render.Facts(
            image=ctx.pooler_image,
            username=creds["username"],
            password=creds["password"],
            allocation=allocation,
            token=token,
            client_userlist=client_userlist,
        ),
    )

    # Running pods learn a smaller pool before the Deployment may add pods.
    pods = await ctx.client.list(
        kube.collection_path("v1", "Pod", pgpool.namespace), label_selector=render.selector_string(pgpool.name)
    )
    push = await fleet.push_limits(
        fleet.running_pod_addresses(pods),
        render.live_limits(pgpool, allocation),
        token,
        port=render.HTTP_PORT,
        timeout=ctx.push_timeout,
    )

    for obj in children.present():
        await apply(ctx.client, obj)
    if children.pdb is None:
        await ctx.client.delete(kube.object_path("policy/v1", "PodDisruptionBudget", pgpool.namespace, pgpool.name))

    # -- status ------------------------------------------------------------------------------------
    if allocation.shortfall is not None:
        enforced = condition(conditions.BUDGET_ENFORCED, False, allocation.shortfall.value, allocation.explain())
    elif push.failed:
        detail = "; ".join(f"{pod}: {why}" for pod, why in sorted(push.failed.items()))
        enforced = condition(
            conditions.BUDGET_ENFORCED,
            False,
            "LimitsNotPushed",
            f"pods still on their old pool size until they take the new one: {detail}",
        )
    else:
        enforced = condition(conditions.BUDGET_ENFORCED, True, "Allocated", allocation.explain())

    deployment = await ctx.client.get(kube.path_of(children.deployment)) or {}
    dep_status = deployment.get("status") or {}
    desired = int(children.deployment["spec"]["replicas"])
    ready_replicas = int(dep_status.get("readyReplicas") or 0)
    status["replicas"] = int(dep_status.get("replicas") or 0)
    status["readyReplicas"] = ready_replicas
    status["budget"] = {
        "total": allocation.total,
        "perPod": allocation.per_pod,
        "pods": allocation.pods,
        "maxConnections": max_connections,
        "backendsInUse": facts.backends_in_use if facts else None,
        "clients": push.total_clients,
    }
    if allocation.shortfall is not None:
        ready = condition(conditions.READY, False, allocation.shortfall.value, allocation.explain())
    else:
        pods_ready = ready_replicas >= desired
        ready = condition(
            conditions.READY,
            pods_ready,
            "PodsReady" if pods_ready else "PodsNotReady",
            f"{ready_replicas}/{desired} pooler pods ready",
        )
    return _finish(pgpool, status, [ready, reachable, enforced], events)
