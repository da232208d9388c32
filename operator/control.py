"""The budget loop: one per PostgreSQL server, shared by every fleet on it.

Each period: read every pod's /status (demand, limit in force, backend PIDs, pause), look
at the server over the kept connection (settings, limits, every client backend), allocate
(allocate.py, pure), push in the safe order (fleet.py). A pod whose pause differs from its
fleet's is told at once (PUT /pause), so one that missed a pause never serves for longer
than a period. The same loop runs in the
operator (pods from the Kubernetes API) and standalone (`pgfleet-operator budget`, pods
from a list of URLs): a fleet only says how to list its pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .allocate import FleetBudget, FleetSpec, PodState, ServerBudget, allocate_server
from .fleet import PodClient, PodReport, PushOutcome, push_in_safe_order
from .observe import DatabaseTarget, DatabaseUnreachable, ServerObserver, ServerSnapshot
from .traffic import PauseReport

log = logging.getLogger("pgfleet.budget")

PodLister = Callable[[], Awaitable[dict[str, str]]]  # pod name -> base URL of its control port


@dataclass(slots=True)
class Fleet:
    """One fleet the loop keeps in budget: its spec and where its pods are."""

    name: str
    token: str
    pods: PodLister
    role: str = ""  # the PostgreSQL role its poolers log in as (its CONNECTION LIMIT applies)
    database: str = ""  # the PostgreSQL database (its CONNECTION LIMIT applies)
    max_backends: int | None = None
    max_backends_percent: int | None = None
    reserve: int = 0
    weight: int = 1
    workers: int = 1
    surge: int = 0
    # spec.pooler.paused: pods that say otherwise are told each period. None: each pod's
    # pause is left as it is (standalone, where nothing declares it).
    paused: bool | None = None


@dataclass(frozen=True, slots=True)
class FleetReport:
    name: str
    budget: FleetBudget
    pods: dict[str, PodReport]
    push: PushOutcome
    fleet_backends: int | None  # its backends PostgreSQL shows, by PID (None: not observed)
    # Its pods' pause after this period's PUT /pause (None: nothing declares one, standalone).
    pause: PauseReport | None = None

    @property
    def limits(self) -> dict[str, int]:
        return {name: report.limit or 0 for name, report in self.push.reports.items() if report.reachable}

    @property
    def unconfirmed(self) -> dict[str, str]:
        """Pods whose limit in force is not known to be within the budget, and why."""
        out = dict(self.push.unconfirmed)
        for name, report in self.pods.items():
            if not report.reachable:
                out.setdefault(name, report.error or "unreachable")
        return out


@dataclass(frozen=True, slots=True)
class PeriodReport:
    at: float  # wall clock of the observation (the period's start)
    took: float  # seconds the period's work took
    # time.monotonic() of the period's start: every push of the period comes after it, so
    # the period's budget bounds what the fleet may hold from then on.
    started: float
    error: str  # why the server was not observed, or ""
    server: ServerBudget
    fleets: dict[str, FleetReport]
    max_connections: int | None = None  # as last observed

    @property
    def observed(self) -> bool:
        return not self.error


@dataclass(slots=True)
class _Memory:
    """What a fleet's loop remembers between periods."""

    confirmed: dict[str, int] = field(default_factory=dict)  # pod -> last limit it confirmed
    pids: dict[str, frozenset[int]] = field(default_factory=dict)  # pod -> backends it last reported
    # Backends its pods reported once and no longer do (closed, or the pod went away): still
    # the fleet's while PostgreSQL shows them exiting, never others'. pid -> periods left.
    released: dict[int, int] = field(default_factory=dict)
    budget: int | None = None

    def release(self, pids: frozenset[int]) -> None:
        for pid in pids:
            self.released[pid] = RELEASED_PERIODS

    def forget_released(self, live: set[int] | None) -> None:
        """A period has passed: released backends that are gone (or too old to trust) are forgotten."""
        for pid, left in list(self.released.items()):
            if left <= 1 or (live is not None and pid not in live):
                del self.released[pid]
            else:
                self.released[pid] = left - 1


# How many periods a backend a pod let go of still counts as its fleet's while PostgreSQL
# shows it (its process exiting, slow on a loaded server); after that its PID could be
# another session's.
RELEASED_PERIODS = 5


class BudgetLoop:
    def __init__(
        self, observer: ServerObserver, *, period: float = 2.0, hysteresis: int = 1, push_timeout: float = 2.0
    ) -> None:
        self.observer = observer
        self.period = period
        self.hysteresis = hysteresis
        self.push_timeout = push_timeout
        self.fleets: dict[str, Fleet] = {}
        self.last: PeriodReport | None = None
        self._memory: dict[str, _Memory] = {}
        self._clients: dict[str, PodClient] = {}
        self._pause_locks: dict[str, asyncio.Lock] = {}

    def set_fleet(self, fleet: Fleet) -> None:
        self.fleets[fleet.name] = fleet

    def drop_fleet(self, name: str) -> None:
        self.fleets.pop(name, None)
        self._memory.pop(name, None)
        self._pause_locks.pop(name, None)

    def pause_lock(self, name: str) -> asyncio.Lock:
        """Held by whoever pushes a fleet's pause (this loop, the operator's reconcile): each
        push sends the spec as it is once the lock is held, so the last push is the latest spec."""
        return self._pause_locks.setdefault(name, asyncio.Lock())

    def _client(self, fleet: Fleet) -> PodClient:
        client = self._clients.get(fleet.name)
        if client is None or client.token != fleet.token:
            client = self._clients[fleet.name] = PodClient(fleet.token, self.push_timeout)
        return client

    async def step(self) -> PeriodReport:
        started, observed_at = time.monotonic(), time.time()
        fleets = list(self.fleets.values())
        # The server first, the pods after: a server a pod opens in between is then
        # reported by the pod and simply not yet seen, rather than counted as others'.
        snapshot: ServerSnapshot | None = None
        error = ""
        try:
            snapshot = await self.observer.snapshot(
                roles=sorted({f.role for f in fleets if f.role}),
                databases=sorted({f.database for f in fleets if f.database}),
            )
        except DatabaseUnreachable as exc:
            error = str(exc)
        pods = await asyncio.gather(*(self._read_pods(fleet) for fleet in fleets))
        reports = {fleet.name: r for fleet, r in zip(fleets, pods, strict=True)}
        # Pausing comes before the budget's work: a pod that should not serve stops first.
        paused = await asyncio.gather(*(self._align_pause(fleet, reports[fleet.name]) for fleet in fleets))
        pauses = {fleet.name: pause for fleet, pause in zip(fleets, paused, strict=True)}
        pids: dict[str, set[int]] = {}
        live = {b.pid for b in snapshot.backends} if snapshot is not None else None
        lingering: dict[str, int] = {}
        for fleet in fleets:
            memory = self._memory.setdefault(fleet.name, _Memory())
            memory.forget_released(live)
            mine: set[int] = set()
            for name, report in reports[fleet.name].items():
                if report.reachable:
                    memory.release(memory.pids.get(name, frozenset()) - report.pids)
                    memory.pids[name] = report.pids
                # An unreachable pod's backends are still its fleet's, not others'.
                mine |= memory.pids.get(name, frozenset())
            for gone in set(memory.pids) - set(reports[fleet.name]):
                memory.release(memory.pids.pop(gone))
                memory.confirmed.pop(gone, None)
            # A backend let go of is the fleet's until it is gone: counted as others', it
            # would lower every budget on the server for as long as it takes to exit.
            released = set(memory.released) - mine
            lingering[fleet.name] = snapshot.held_by(released) if snapshot is not None else 0
            pids[fleet.name] = mine | released
        all_pids = set().union(*pids.values()) if pids else set()
        facts = snapshot.facts(all_pids) if snapshot is not None else None
        specs = [self._spec(fleet, reports[fleet.name]) for fleet in fleets]
        server = allocate_server(facts, specs, hysteresis=self.hysteresis)
        out: dict[str, FleetReport] = {}
        pushes = await asyncio.gather(
            *(self._push(fleet, reports[fleet.name], server, lingering.get(fleet.name, 0)) for fleet in fleets)
        )
        for fleet, push in zip(fleets, pushes, strict=True):
            budget = server.fleets[fleet.name]
            self._memory[fleet.name].budget = budget.budget
            out[fleet.name] = FleetReport(
                name=fleet.name,
                budget=budget,
                pods=reports[fleet.name],
                push=push,
                fleet_backends=snapshot.held_by(pids[fleet.name]) if snapshot is not None else None,
                pause=pauses[fleet.name],
            )
        period = PeriodReport(
            at=observed_at,
            took=time.monotonic() - started,
            started=started,
            error=error,
            server=server,
            fleets=out,
            max_connections=snapshot.max_connections if snapshot is not None else None,
        )
        self.last = period
        return period

    async def _read_pods(self, fleet: Fleet) -> dict[str, PodReport]:
        try:
            pods = await fleet.pods()
        except Exception as exc:  # a fleet whose pods cannot be listed is skipped, not the loop
            log.warning("fleet %s: cannot list pods: %s", fleet.name, exc)
            pods = {}
        return await self._client(fleet).statuses(pods)

    async def _align_pause(self, fleet: Fleet, reports: dict[str, PodReport]) -> PauseReport | None:
        """PUT /pause to each pod whose pause differs from the fleet's: one that started from a
        ConfigMap the kubelet had not updated yet, or that missed the reconcile's push.

        Returns where the pods stand after it (TrafficPaused between full reconciles): the
        servers each still holds as its /status said, its pause as its answer says.
        """
        async with self.pause_lock(fleet.name):
            # The spec as it is now: a reconcile may have changed it while the pods were read.
            current = self.fleets.get(fleet.name)
            wanted = current.paused if current is not None else None
            if wanted is None:
                return None
            # A draining pod stays paused whatever it is told (it answers 409), and is leaving:
            # it is neither told nor counted.
            staying = {name: r for name, r in reports.items() if not r.draining}
            stale = sorted(n for n, r in staying.items() if r.reachable and r.paused != wanted)
            client = self._client(fleet)
            answers = await asyncio.gather(*(client.pause(reports[name].url, wanted) for name in stale))
        pause = PauseReport(wanted=wanted)
        for name, report in staying.items():
            if report.reachable:
                pause.servers[name], pause.paused[name] = report.held, report.paused
            elif wanted:
                # Not known to be paused. (While serving is wanted, a pod that does not answer,
                # one starting say, serves nobody and starts serving: BudgetEnforced names it.)
                pause.failed[name] = report.error or "unreachable"
        for name, (now, servers, error) in zip(stale, answers, strict=True):
            if error:
                log.warning("fleet %s: pod %s did not take paused=%s: %s", fleet.name, name, wanted, error)
                del pause.servers[name], pause.paused[name]
                pause.failed[name] = error
                continue
            # Its answer is newer than its /status: a transaction begun in between holds a server.
            pause.paused[name], pause.servers[name] = bool(now), servers
            if now == wanted:
                log.info("fleet %s: pod %s %s, as the spec says", fleet.name, name, "paused" if wanted else "resumed")
            # else: paused by hand on its console; the operator lifts only its own pause
        return pause

    def _spec(self, fleet: Fleet, reports: dict[str, PodReport]) -> FleetSpec:
        memory = self._memory[fleet.name]
        states = []
        for name, report in sorted(reports.items()):
            if report.reachable:
                states.append(
                    PodState(name, limit=report.limit, held=report.held, active=report.active, waiting=report.waiting)
                )
            else:
                states.append(PodState(name, limit=memory.confirmed.get(name), reachable=False))
        return FleetSpec(
            name=fleet.name,
            role=fleet.role,
            database=fleet.database,
            max_backends=fleet.max_backends,
            max_backends_percent=fleet.max_backends_percent,
            reserve=fleet.reserve,
            weight=fleet.weight,
            workers=fleet.workers,
            surge=fleet.surge,
            pods=tuple(states),
            budget=memory.budget,
        )

    async def _push(
        self, fleet: Fleet, reports: dict[str, PodReport], server: ServerBudget, lingering: int
    ) -> PushOutcome:
        budget = server.fleets[fleet.name]
        targets = {name: limit for name, limit in budget.limits.items() if reports[name].reachable}
        return await push_in_safe_order(
            self._client(fleet),
            reports,
            targets,
            # Backends its pods closed that PostgreSQL still shows exiting take room too: a
            # raise waits for them rather than pass the budget on the server's count.
            budget=budget.budget - budget.surge_room - lingering,
            confirmed=self._memory[fleet.name].confirmed,
        )

    async def run(self, on_report: Callable[[PeriodReport], None] | None = None) -> None:
        """Step every `period` seconds until cancelled; a failed period is logged, not fatal.

        However it ends, the loop closes what it holds: whoever cancels it (its PgPool's
        deletion, the operator's shutdown, or kopf cancelling what is left at its exit) may
        never call `close`.
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    report = await self.step()
                except Exception:
                    log.exception("budget period failed")
                except asyncio.CancelledError:
                    log.info("budget loop stops")
                    raise
                except BaseException as exc:
                    log.error("budget loop ends: %r", exc)
                    raise
                else:
                    if on_report is not None:
                        on_report(report)
                await asyncio.sleep(max(0.0, self.period - (loop.time() - started)))
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the observer's connection and the pods' HTTP sessions; again is harmless."""
        try:
            with contextlib.suppress(Exception):
                await self.observer.close()  # cancelled meanwhile, it terminates the connection
        finally:
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                await client.close()


class BudgetLoops:
    """The operator's loops: one per PostgreSQL server (host, port), shared by its PgPools.

    A PgPool's reconcile registers its fleet (`register`); the loop of its server starts
    with the first fleet and stops with the last. The observer connects with the
    credentials and TLS settings of one of its fleets (the first; when it leaves, the next
    that registers), and follows them when they change.
    """

    def __init__(self, *, period: float, push_timeout: float, probe_timeout: float) -> None:
        self.period = period
        self.push_timeout = push_timeout
        self.probe_timeout = probe_timeout
        self._loops: dict[tuple[str, int], tuple[BudgetLoop, asyncio.Task[None]]] = {}
        self._server_of: dict[str, tuple[str, int]] = {}
        self._observer_of: dict[tuple[str, int], str] = {}  # server -> the fleet whose target it uses
        self._closed = False

    def register(self, fleet: Fleet, target: DatabaseTarget) -> BudgetLoop:
        server = (target.host, target.port)
        if self._server_of.get(fleet.name, server) != server:
            self.unregister(fleet.name)  # its database moved to another server
        entry = self._loops.get(server)
        if entry is None:
            loop = BudgetLoop(
                ServerObserver(target=target, timeout=self.probe_timeout),
                period=self.period,
                push_timeout=self.push_timeout,
            )
            if self._closed:
                # A reconcile still running while the operator stops: a loop started now would
                # outlive `close` and open a connection nothing closes.
                return loop
            task = asyncio.get_running_loop().create_task(loop.run(), name=f"budget {target.host}:{target.port}")
            entry = self._loops[server] = (loop, task)
        if self._observer_of.setdefault(server, fleet.name) == fleet.name:
            entry[0].observer.retarget(target)
        entry[0].set_fleet(fleet)
        self._server_of[fleet.name] = server
        return entry[0]

    def unregister(self, name: str) -> None:
        server = self._server_of.pop(name, None)
        if server is None or server not in self._loops:
            return
        loop, task = self._loops[server]
        loop.drop_fleet(name)
        if self._observer_of.get(server) == name:
            del self._observer_of[server]
        if not loop.fleets:
            del self._loops[server]
            closing = asyncio.get_running_loop().create_task(_retire(loop, task))
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)

    def pause_lock(self, name: str) -> asyncio.Lock:
        """The lock of the fleet's pause pushes, shared with its server's loop (BudgetLoop.pause_lock)."""
        server = self._server_of.get(name)
        if server is None or server not in self._loops:
            return asyncio.Lock()  # no loop pushes this fleet's pause
        return self._loops[server][0].pause_lock(name)

    def report(self, name: str) -> tuple[PeriodReport, FleetReport] | None:
        """The last period's report of the fleet's server and of the fleet, once there is one."""
        server = self._server_of.get(name)
        if server is None or server not in self._loops:
            return None
        last = self._loops[server][0].last
        if last is None or name not in last.fleets:
            return None
        return last, last.fleets[name]

    def reports(self) -> list[tuple[str, PeriodReport]]:
        """Each server ("host:port") and its loop's last report, of the fleets still registered.

        Called from the metrics thread: it copies before it reads and never mutates.
        """
        out = []
        for (host, port), (loop, _task) in list(self._loops.items()):
            last, names = loop.last, set(loop.fleets)
            if last is not None:
                fleets = {name: report for name, report in last.fleets.items() if name in names}
                out.append((f"{host}:{port}", dataclasses.replace(last, fleets=fleets)))
        return out

    async def close(self) -> None:
        self._closed = True
        for loop, task in self._loops.values():
            await _retire(loop, task)
        if _closing:  # loops of PgPools deleted just before: their connections too
            await asyncio.gather(*_closing, return_exceptions=True)
        self._loops.clear()
        self._server_of.clear()
        self._observer_of.clear()


_closing: set[asyncio.Task[None]] = set()


async def _retire(loop: BudgetLoop, task: asyncio.Task[None]) -> None:
    """Stop a loop and wait for it: it closes what it holds as it ends (closing from here
    first could miss a connection its period was just opening)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await loop.close()  # a loop whose task never started closes nothing by itself
