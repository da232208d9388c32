"""Talking to running pooler pods over their HTTP control port: reading each one's
GET /status (demand, limit in force, backend PIDs) and pushing pool limits live with
PUT /limits, lowering first (push_in_safe_order).

A new pod starts at the ConfigMap's floor; the budget loop moves running pods from there,
so a change of replicas or budget never needs a rolling restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp


def running_pod_addresses(pods: Sequence[Mapping[str, Any]], *, terminating: bool = False) -> dict[str, str]:
    """Pod name -> IP of the running pods, those being deleted only with `terminating`.

    A pod being deleted still drains: until its containers exit it holds the servers of the
    transactions it finishes, so the budget counts it (`terminating=True`) while its clients
    have gone elsewhere.
    """
    out = {}
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        if meta.get("deletionTimestamp") and not terminating:
            continue
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        out[str(meta["name"])] = str(status["podIP"])
    return out


def pod_url(ip: str, port: int) -> str:
    """The base URL of a pod's control port (an IPv6 address in brackets)."""
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


# -- the budget loop's side: read each pod's /status, push limits in the safe order ------------------


@dataclass(frozen=True, slots=True)
class PodReport:
    """What one pod's GET /status said (reachable), or that it did not answer."""

    name: str
    url: str
    reachable: bool
    error: str = ""
    limit: int | None = None  # the pool limit in force for the fleet's database(s)
    held: int = 0  # server connections, logins included
    active: int = 0
    idle: int = 0
    clients: int = 0
    waiting: int = 0
    maxwait: float = 0.0
    pids: frozenset[int] = frozenset()
    databases: tuple[str, ...] = ()  # the databases it fronts, as PUT /limits names them
    min_pool_size: int = 0
    paused: bool = False  # the whole pooler is PAUSEd (PUT /pause, start_paused, its console)
    draining: bool = False  # shutting down: it stays paused whatever it is told


def limit_in_force(limits: Mapping[str, Any]) -> int:
    """A pod's backend limit from the `limits` of its /status: the smallest cap on any database.

    A database's cap is its pool size bounded by max_db_connections (0: no bound), each
    falling back to the global setting.
    """
    default_pool = int(limits.get("default_pool_size") or 0)
    default_max = int(limits.get("max_db_connections") or 0)
    caps = []
    for name, db in (limits.get("databases") or {}).items():
        del name
        pool = db.get("pool_size")
        cap = int(pool if pool is not None else default_pool)
        most = db.get("max_db_connections")
        most = int(most if most is not None else default_max)
        caps.append(min(cap, most) if most else cap)
    if not caps:
        caps.append(min(default_pool, default_max) if default_max else default_pool)
    return min(caps)


def parse_status(name: str, url: str, body: Mapping[str, Any]) -> PodReport:
    totals = body.get("totals") or {}
    limits = body.get("limits") or {}
    return PodReport(
        name=name,
        url=url,
        reachable=True,
        limit=limit_in_force(limits),
        held=int(body.get("servers") or 0),
        active=int(totals.get("servers_active") or 0),
        idle=int(totals.get("servers_idle") or 0),
        clients=int(body.get("clients") or 0),
        waiting=int(totals.get("clients_waiting") or 0),
        maxwait=float(body.get("maxwait_seconds") or 0.0),
        pids=frozenset(int(pid) for pid in body.get("backend_pids") or ()),
        databases=tuple(sorted((limits.get("databases") or {}).keys())),
        min_pool_size=int(limits.get("min_pool_size") or 0),
        paused=bool(body.get("paused")),
        draining=bool(body.get("draining")),
    )


def limits_body(limit: int, report: PodReport) -> dict[str, Any]:
    """PUT /limits for a pod limit: every limit the ConfigMap sets, globally and per database."""
    body: dict[str, Any] = {"default_pool_size": limit, "max_db_connections": limit}
    if report.min_pool_size > limit:
        body["min_pool_size"] = limit  # the pooler refuses a pool below its minimum
    if report.databases:
        body["databases"] = {db: {"pool_size": limit, "max_db_connections": limit} for db in report.databases}
    return body


class PodClient:
    """GET /status, PUT /limits and PUT /pause on pods' control ports, over one HTTP session."""

    def __init__(self, token: str, timeout: float = 2.0) -> None:
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": f"Bearer {self.token}"},
            )
        return self._session

    async def status(self, name: str, url: str) -> PodReport:
        try:
            async with self._open().get(f"{url}/status") as response:
                if response.status != 200:
                    return PodReport(name, url, reachable=False, error=f"HTTP {response.status}")
                return parse_status(name, url, await response.json())
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            return PodReport(name, url, reachable=False, error=str(exc) or type(exc).__name__)

    async def statuses(self, pods: Mapping[str, str]) -> dict[str, PodReport]:
        reports = await asyncio.gather(*(self.status(name, url) for name, url in sorted(pods.items())))
        return {report.name: report for report in reports}

    async def push(self, report: PodReport, limit: int) -> PodReport:
        """PUT the limit, then read /status back: the report shows whether it is in force."""
        try:
            async with self._open().put(f"{report.url}/limits", json=limits_body(limit, report)) as response:
                if response.status >= 300:
                    text = (await response.text())[:200]
                    return replace(report, reachable=False, error=f"HTTP {response.status}: {text}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return replace(report, reachable=False, error=str(exc) or type(exc).__name__)
        return await self.status(report.name, report.url)

    async def pause(self, url: str, paused: bool) -> tuple[bool | None, int, str]:
        """PUT /pause: (whether the pod says it is paused now, the servers it still holds, "")
        or (None, 0, why it did not answer)."""
        try:
            async with self._open().put(f"{url}/pause", json={"paused": paused}) as response:
                if response.status != 200:
                    return None, 0, f"HTTP {response.status}: {(await response.text())[:200]}"
                body = await response.json()
                return bool(body["paused"]), int(body["servers"]), ""
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            return None, 0, str(exc) or type(exc).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class PushOutcome:
    reports: dict[str, PodReport]  # after the pushes: what each pod says now
    lowered: list[str] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    held_back: dict[str, int] = field(default_factory=dict)  # pod -> limit it should get once safe
    unconfirmed: dict[str, str] = field(default_factory=dict)  # pod -> why its limit is not confirmed


async def push_in_safe_order(
    client: PodClient,
    reports: Mapping[str, PodReport],
    targets: Mapping[str, int],
    *,
    budget: int,
    confirmed: dict[str, int],
) -> PushOutcome:
    """Bring pods to `targets` without the fleet ever being allowed more than `budget`.

    Lowering first; raising only once every lowered pod confirms (its /status shows the
    new limit), and only into room that is free now: each other pod counts at the larger
    of its limit and the servers it still holds (a lowered pod closes busy servers only as
    they come back), an unreachable one at the last limit it confirmed. `confirmed`
    (pod -> last confirmed limit) is updated in place; the caller keeps it across periods.
    """
    out = PushOutcome(reports=dict(reports))
    for name, report in reports.items():
        if report.reachable and report.limit is not None:
            confirmed[name] = report.limit

    def count(name: str) -> int:
        report = out.reports[name]
        if not report.reachable:
            return confirmed.get(name, 0)
        return max(report.limit or 0, report.held)

    lower = [n for n, t in targets.items() if n in reports and reports[n].reachable and t < (reports[n].limit or 0)]
    results = await asyncio.gather(*(client.push(reports[name], targets[name]) for name in lower))
    for name, after in zip(lower, results, strict=True):
        out.reports[name] = after
        if after.reachable and after.limit == targets[name]:
            confirmed[name] = targets[name]
            out.lowered.append(name)
        else:
            out.unconfirmed[name] = after.error or f"limit in force {after.limit}, wanted {targets[name]}"
    raise_ = sorted(
        (n for n, t in targets.items() if n in reports and reports[n].reachable and t > (reports[n].limit or 0)),
        key=lambda n: (reports[n].limit or 0) - targets[n],  # the largest raise first
    )
    if out.unconfirmed:
        out.held_back.update((name, targets[name]) for name in raise_)
        return out
    allowed: dict[str, int] = {}
    for name in raise_:
        room = budget - sum(count(other) for other in out.reports if other != name and other not in allowed)
        room -= sum(allowed.values())
        limit = min(targets[name], max(out.reports[name].limit or 0, room))
        if limit > (out.reports[name].limit or 0):
            allowed[name] = limit
        if limit < targets[name]:
            out.held_back[name] = targets[name]
    results = await asyncio.gather(*(client.push(out.reports[name], limit) for name, limit in allowed.items()))
    for (name, limit), after in zip(allowed.items(), results, strict=True):
        out.reports[name] = after
        if after.reachable and after.limit == limit:
            confirmed[name] = limit
            out.raised.append(name)
        else:
            # Counted at the higher limit until it says otherwise: the push may have landed.
            confirmed[name] = max(confirmed.get(name, 0), limit)
            out.unconfirmed[name] = after.error or f"limit in force {after.limit}, wanted {limit}"
    return out
