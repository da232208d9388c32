"""The budget loop against a real PostgreSQL and real pooler processes (standalone, no Kubernetes).

PostgreSQL has max_connections 50 with 3 reserved for superusers: 47 usable. The fleet's
poolers log in as `fleet`, another application as `other`; a sampler reads
pg_stat_activity every 100 ms and the invariants are checked against what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from pgfleet.devtools.fleetlab import (
    FLEET_ROLE,
    OTHER_ROLE,
    TOKEN,
    Crowd,
    CrowdStats,
    Grabber,
    LabPooler,
    Sample,
    Sampler,
    budget_in_force,
    start_fleet_pooler,
)
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.operator.control import BudgetLoop, BudgetLoops, Fleet, PeriodReport
from pgfleet.operator.observe import DatabaseTarget, ServerObserver

PERIOD = 0.5


@dataclass
class Run:
    """A running loop: every period's report, with the monotonic time it came."""

    loop: BudgetLoop
    reports: list[tuple[float, PeriodReport]] = field(default_factory=list)

    def record(self, report: PeriodReport) -> None:
        self.reports.append((time.monotonic(), report))

    def budget_at(self, name: str, sample: Sample) -> int:
        """The fleet's budget in force when `sample` counted, by the loop's own clock (budget_in_force)."""
        periods = [(r.started, r.fleets[name].budget.budget) for _, r in self.reports if name in r.fleets]
        budget = budget_in_force(periods, sample)
        assert budget is not None, "a sample before the first period"
        return budget

    async def periods_to(self, what: Callable[[PeriodReport], bool], since: float, timeout: float = 60) -> int:
        """How many periods that began after `since` it took until one satisfied `what` (1: the first)."""
        await self.until(lambda r: r.started > since and what(r), timeout)
        after = [r for _, r in self.reports if r.started > since]
        return next(i for i, r in enumerate(after, 1) if what(r))

    async def until(self, what: Callable[[PeriodReport], bool], timeout: float = 60) -> float:
        """Wait for a report that satisfies `what`; seconds it took."""
        start = time.monotonic()
        seen = len(self.reports)
        while True:
            for _, report in self.reports[seen:]:
                if what(report):
                    return time.monotonic() - start
            seen = len(self.reports)
            assert time.monotonic() - start < timeout, f"not reached in {timeout} s: {self.reports[-1][1]}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def control(labdb: TempPostgres) -> AsyncIterator[Callable[..., Run]]:
    tasks: list[asyncio.Task[None]] = []
    loops: list[BudgetLoop] = []

    def start(*fleets: tuple[str, list[LabPooler], dict[str, int]]) -> Run:
        loop = BudgetLoop(ServerObserver(labdb.dsn(), timeout=2), period=PERIOD)
        for name, poolers, spec in fleets:
            urls = {p.name: p.url for p in poolers}

            async def pods(urls: dict[str, str] = urls) -> dict[str, str]:
                return urls

            loop.set_fleet(Fleet(name=name, token=TOKEN, pods=pods, role=FLEET_ROLE, database="app", **spec))
        run = Run(loop)
        tasks.append(asyncio.create_task(loop.run(run.record)))
        loops.append(loop)
        return run

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for loop in loops:
        await loop.close()


@pytest.fixture
def poolers(labdb: TempPostgres, tmp_path: Path) -> Iterator[Callable[[int], list[LabPooler]]]:
    started: list[LabPooler] = []

    def start(count: int, prefix: str = "p") -> list[LabPooler]:
        new = [start_fleet_pooler(labdb, tmp_path, f"{prefix}{len(started) + i}") for i in range(count)]
        started.extend(new)
        return new

    yield start
    for pooler in started:
        pooler.stop()


def fleet_within_budget(sampler: Sampler, run: Run, name: str, role: str = FLEET_ROLE) -> tuple[int, int]:
    """Check every sample since the first report; (backends, budget) where their ratio was highest."""
    first = run.reports[0][1].started
    worst = (0, 0)
    for sample in sampler.since(first):
        held, budget = sample.count(role), run.budget_at(name, sample)
        assert held <= budget, f"the fleet held {held} backends against a budget of {budget}"
        if budget and (not worst[1] or held / budget > worst[0] / worst[1]):
            worst = (held, budget)
    return worst


async def test_others_come_and_go_demand_moves_and_no_client_sees_53300(
    labdb: TempPostgres, poolers: Callable[[int], list[LabPooler]], control: Callable[..., Run]
) -> None:
    fleet = poolers(3)
    sampler = Sampler(labdb)
    await sampler.start()
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in fleet]
    grabber = Grabber(labdb)
    run = control(("fleet", fleet, {"max_backends": 40}))
    try:
        for crowd in crowds:
            crowd.add_steady(4)
        # Alone on the server (but for the sampler): the whole spec, split evenly.
        await run.until(
            lambda r: r.fleets["fleet"].budget.budget == 40 and sum(r.fleets["fleet"].limits.values()) == 40
        )

        # Another application takes 30 backends: the fleet's budget follows, clients queue.
        assert await grabber.grab(30, time.monotonic() + 60) == 30  # generous: a loaded machine
        grabbed = await sampler.first(lambda s: s.count(OTHER_ROLE) == 30)
        shrink = await run.periods_to(lambda r: r.fleets["fleet"].budget.budget <= 47 - 31 - 1, grabbed)
        for crowd in crowds:
            crowd.add_steady(10)  # more demand than the budget: they wait in the poolers
        await run.until(lambda r: r.fleets["fleet"].budget.waiting > 0)

        # Demand moves to one pooler: it gets the larger share.
        await crowds[1].stop()
        await crowds[2].stop()
        follow = await run.periods_to(
            lambda r: (lim := r.fleets["fleet"].limits)[fleet[0].name] > max(lim[fleet[1].name], lim[fleet[2].name]),
            time.monotonic(),
        )

        # The other application lets go: the fleet grows back to its spec.
        await grabber.release()
        released = await sampler.first(lambda s: s.count(OTHER_ROLE) == 0)
        grow = await run.periods_to(
            lambda r: r.fleets["fleet"].budget.budget == 40 and sum(r.fleets["fleet"].limits.values()) == 40, released
        )
    finally:
        for crowd in crowds:
            await crowd.stop()
        await grabber.release()
        await sampler.stop()
    most, budget_then = fleet_within_budget(sampler, run, "fleet")
    assert stats.errors == {}, stats.errors  # no 53300, no failed transaction
    assert stats.transactions > 100
    print(
        f"\nfleet backends at most {most} against a budget of {budget_then} (closest sample); transactions "
        f"{stats.transactions}, failed {stats.failed}; periods to follow (period {PERIOD} s): the squeeze {shrink}, "
        f"demand moving {follow}, others letting go {grow}"
    )
    # Each change is followed within two periods of the loop seeing it (counted in periods, so
    # that a loaded machine, whose periods stretch, does not change the verdict).
    assert max(shrink, follow, grow) <= 2, (shrink, follow, grow)


async def test_two_fleets_share_a_server(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run]
) -> None:
    a = poolers(2, "a")
    b = poolers(1, "b")
    sampler = Sampler(labdb)
    await sampler.start()
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in (*a, *b)]
    # Both ask 80% of the server; whole fleets' role is the same, so each fleet is told apart by PID.
    run = control(("a", a, {"max_backends_percent": 80}), ("b", b, {"max_backends_percent": 80}))
    try:
        for crowd in crowds:
            crowd.add_steady(30)  # more than either fleet may serve at once
        await run.until(lambda r: r.fleets["a"].budget.budget > 0 and r.fleets["b"].budget.budget > 0)
        report = run.reports[-1][1]
        total = report.fleets["a"].budget.budget + report.fleets["b"].budget.budget
        assert report.server.usable is not None and report.server.others is not None
        assert total <= report.server.usable - report.server.others
        # Equal weights: equal shares (the odd one to the first by name), over every period.
        for _, each in run.reports:
            assert 0 <= each.fleets["a"].budget.budget - each.fleets["b"].budget.budget <= 1
        await run.until(lambda r: all(f.budget.waiting > 0 for f in r.fleets.values()))
        # Every backend of the role counted by exactly one fleet, by PID.
        await run.until(
            lambda r: (r.fleets["a"].fleet_backends or 0) + (r.fleets["b"].fleet_backends or 0) >= 40, timeout=30
        )
    finally:
        for crowd in crowds:
            await crowd.stop()
        await sampler.stop()
    first = run.reports[0][1].started
    for sample in sampler.since(first):
        both = run.budget_at("a", sample) + run.budget_at("b", sample)
        assert sample.count(FLEET_ROLE) <= both
    assert stats.errors == {}, stats.errors


async def test_an_unreachable_pod_keeps_its_limit_and_the_database_going_away_lets_nothing_grow(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run]
) -> None:
    fleet = poolers(3)
    run = control(("fleet", fleet, {"max_backends": 30}))
    await run.until(lambda r: sum(r.fleets["fleet"].limits.values()) == 30)
    gone = fleet[2]
    confirmed = run.reports[-1][1].fleets["fleet"].limits[gone.name]
    gone.stop()
    report_at = len(run.reports)
    await run.until(lambda r: gone.name in r.fleets["fleet"].unconfirmed)
    for _, report in run.reports[report_at + 2 :]:
        live = sum(v for k, v in report.fleets["fleet"].limits.items() if k != gone.name)
        assert live + confirmed <= 30  # it still counts at what it last confirmed
    # The database cannot be observed: limits may go down, never up.
    crowd = Crowd(fleet[0].port)
    crowd.add_steady(20)  # demand that would earn fleet[0] a larger share
    before = dict(run.reports[-1][1].fleets["fleet"].limits)
    labdb.stop()
    try:
        await run.until(lambda r: not r.observed)
        blind_from = len(run.reports)
        await run.until(lambda r: len(run.reports) > blind_from + 3)
        for _, report in run.reports[blind_from:]:
            assert not report.observed
            for name, limit in report.fleets["fleet"].limits.items():
                assert limit <= before.get(name, limit), (name, limit, before)
    finally:
        await crowd.stop()
        labdb.restart_server()
    await run.until(lambda r: r.observed)  # the kept connection is opened again


async def test_a_pod_that_stops_answering_keeps_counting_at_its_limit_while_the_others_want_more(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run]
) -> None:
    """A pod that holds most of the budget stops answering (SIGSTOP: its servers stay open) and
    the load moves to the other pods: they may share only what it leaves, period after period."""
    fleet = poolers(3)
    sampler = Sampler(labdb)
    await sampler.start()
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in fleet]
    stalled = CrowdStats()  # the clients of the stopped pod wait for it; they are not counted
    run = control(("fleet", fleet, {"max_backends": 30}))
    frozen = fleet[2]
    stopped = False
    try:
        crowds[2] = Crowd(frozen.port, stats=stalled)
        crowds[2].add_steady(30)
        await run.until(lambda r: r.fleets["fleet"].limits.get(frozen.name, 0) >= 20)
        limit = run.reports[-1][1].fleets["fleet"].limits[frozen.name]
        os.kill(frozen.process.pid, signal.SIGSTOP)
        stopped = True
        for crowd in crowds[:2]:
            crowd.add_steady(12)  # demand that a loop counting the silent pod at 0 would serve
        await run.until(lambda r: frozen.name in r.fleets["fleet"].unconfirmed)
        since = time.monotonic()
        await run.until(lambda r: sum(1 for _, x in run.reports if x.started > since) >= 4)
        for _, report in run.reports:
            if report.started > since:
                live = sum(v for k, v in report.fleets["fleet"].limits.items() if k != frozen.name)
                assert live + limit <= 30, report.fleets["fleet"].limits  # it counts at what it confirmed
        os.kill(frozen.process.pid, signal.SIGCONT)
        stopped = False
        await run.until(lambda r: not r.fleets["fleet"].unconfirmed)
    finally:
        if stopped:
            os.kill(frozen.process.pid, signal.SIGCONT)
        for crowd in crowds:
            await crowd.stop()
        await sampler.stop()
    fleet_within_budget(sampler, run, "fleet")
    assert stats.errors == {}, stats.errors
    assert "53300" not in stalled.errors, stalled.errors


async def test_the_standalone_command(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], tmp_path: Path
) -> None:
    fleet = poolers(2)
    token_file = tmp_path / "token"
    argv = [
        sys.executable, "-m", "pgfleet.operator", "budget", "--dsn", labdb.dsn(),
        *(arg for p in fleet for arg in ("--pooler", p.url)), "--token-file", str(token_file),
        "--max-backends", "10", "--reserve", "2", "--period", "0.3", "--json", "--periods", "6",
    ]  # fmt: skip
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 6
    last = lines[-1]
    assert last["usable"] == 47 and last["fleets"]["fleet"]["budget"] == 8  # 10 - the reserve
    assert sorted(pod["limit"] for pod in last["fleets"]["fleet"]["pods"].values()) == [4, 4]
    bad = await asyncio.to_thread(subprocess.run, [*argv[:4], "--max-backends", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr


async def test_a_pod_that_restarts_comes_back_at_the_floor_and_the_fleet_stays_in_budget(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run], tmp_path: Path
) -> None:
    fleet = poolers(3)
    sampler = Sampler(labdb)
    await sampler.start()
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in fleet[:2]]
    run = control(("fleet", fleet, {"max_backends": 30}))
    try:
        for crowd in crowds:
            crowd.add_steady(12)
        await run.until(lambda r: sum(r.fleets["fleet"].limits.values()) == 30)
        # The third pod restarts: same address, a new process at the ConfigMap's floor.
        old = fleet[2]
        await asyncio.to_thread(old.stop)
        await run.until(lambda r: old.name in r.fleets["fleet"].unconfirmed)
        new = await asyncio.to_thread(start_fleet_pooler, labdb, tmp_path, old.name, http_port=old.http_port)
        fleet[2] = new
        back = await run.until(
            lambda r: old.name not in r.fleets["fleet"].unconfirmed and sum(r.fleets["fleet"].limits.values()) == 30
        )
    finally:
        for crowd in crowds:
            await crowd.stop()
        await sampler.stop()
        await asyncio.to_thread(fleet[2].stop)
    fleet_within_budget(sampler, run, "fleet")
    assert stats.errors == {}, stats.errors
    print(f"\nthe restarted pod was back in the budget {back:.2f} s after it listened again")


async def test_postgresql_restarts_and_the_fleet_comes_back_within_budget(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run]
) -> None:
    fleet = poolers(3)
    sampler = Sampler(labdb)
    await sampler.start()
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in fleet]
    grabber = Grabber(labdb)
    run = control(("fleet", fleet, {"max_backends": 30}))
    try:
        assert await grabber.grab(12, time.monotonic() + 60) == 12
        for crowd in crowds:
            crowd.add_steady(12)  # more than each pooler's share: clients queue in the poolers
        # 47 usable - 12 others - the sampler - the observer leaves 33: the spec's 30 holds.
        await run.until(
            lambda r: r.fleets["fleet"].budget.budget == 30 and (r.fleets["fleet"].fleet_backends or 0) > 20
        )
        before = dict(stats.errors)
        down_at = time.monotonic()
        await asyncio.to_thread(labdb.stop)
        await run.until(lambda r: not r.observed)
        await asyncio.to_thread(labdb.restart_server)
        # The other application comes back too, as fast as it can.
        await grabber.release()
        assert await grabber.grab(12, time.monotonic() + 60) == 12
        served = stats.transactions
        back = await run.until(
            lambda r: (
                r.observed
                and r.fleets["fleet"].budget.budget == 30
                and not r.fleets["fleet"].unconfirmed
                and stats.transactions > served + 50
            )
        )
        back_after = time.monotonic() - down_at
        during = stats.errors - Counter(before)
        # A clean stretch once it is back: no client error at all.
        calm = dict(stats.errors)
        done = stats.transactions
        await run.until(lambda r: stats.transactions > done + 200)
        assert stats.errors == calm, stats.errors - Counter(calm)
    finally:
        for crowd in crowds:
            await crowd.stop()
        await grabber.release()
        await sampler.stop()
    most, budget_then = fleet_within_budget(sampler, run, "fleet")
    # The fleet's clients never see PostgreSQL's 53300: what the restart cut (transactions in
    # flight when PostgreSQL stopped) they do see, and only then.
    assert "53300" not in stats.errors and before == {}, stats.errors
    print(
        f"\nPostgreSQL restart: fleet backends at most {most} against {budget_then}; clients saw {dict(during)} "
        f"while it was down, none after; back in budget and serving {back_after:.2f} s after the stop "
        f"({back:.2f} s after it listened again); samples missed while down: {sampler.gaps}"
    )


async def test_a_backend_that_is_slow_to_exit_stays_the_fleets(
    labdb: TempPostgres, poolers: Callable[..., list[LabPooler]], control: Callable[..., Run]
) -> None:
    """A pod goes away while PostgreSQL still shows one of its backends (its process stopped, as
    a loaded server is slow to reap): the loop keeps counting it as the fleet's, not as others'."""
    fleet = poolers(2)
    urls = {p.name: p.url for p in fleet}
    loop = BudgetLoop(ServerObserver(labdb.dsn(), timeout=2), period=PERIOD)

    async def pods() -> dict[str, str]:
        return dict(urls)

    loop.set_fleet(Fleet(name="fleet", token=TOKEN, pods=pods, role=FLEET_ROLE, database="app", max_backends=20))
    crowd = Crowd(fleet[1].port)
    stopped: int | None = None
    # Kept open from the start (it is in others' baseline): a psql run for each look would
    # leave a backend exiting that the next period counts as another's.
    watch = await asyncpg.connect(labdb.dsn())
    try:
        crowd.add_steady(3)
        report = await loop.step()
        deadline = time.monotonic() + 60
        while not report.fleets["fleet"].pods[fleet[1].name].pids and time.monotonic() < deadline:
            await asyncio.sleep(PERIOD)
            report = await loop.step()
        baseline = report.server.others
        await crowd.stop()  # its servers go idle; one backend then stops running
        stopped = min(report.fleets["fleet"].pods[fleet[1].name].pids)
        os.kill(stopped, signal.SIGSTOP)
        # The pod is gone: its process exits and PostgreSQL reaps its backends, but the stopped one.
        del urls[fleet[1].name]
        await asyncio.to_thread(fleet[1].stop)
        for _ in range(2):
            report = await loop.step()
            shown = await watch.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", FLEET_ROLE)
            assert shown >= 1  # PostgreSQL still shows it
            assert report.server.others == baseline, report.server
            assert report.fleets["fleet"].fleet_backends == 1  # the fleet's, though no pod reports it
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        await crowd.stop()
        await watch.close()
        await loop.close()


async def _budget_backends(labdb: TempPostgres) -> int:
    out = await asyncio.to_thread(
        labdb.sql, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgfleet-budget'"
    )
    return int(out.strip())


async def test_a_cancelled_loop_closes_its_connection(labdb: TempPostgres) -> None:
    """Whoever cancels the loop (kopf, at its exit, cancels what is left running) need not close it:
    its observer's connection ends with it instead of lingering until the collector finds it."""
    loop = BudgetLoop(ServerObserver(labdb.dsn(), timeout=2), period=PERIOD)
    run = Run(loop)
    task = asyncio.create_task(loop.run(run.record))
    try:
        await run.until(lambda report: True)
        assert await _budget_backends(labdb) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    deadline = time.monotonic() + 30
    while await _budget_backends(labdb):
        assert time.monotonic() < deadline, "the cancelled loop's connection is still open"
        await asyncio.sleep(0.05)


async def test_a_reconcile_after_the_operators_close_starts_no_loop(labdb: TempPostgres) -> None:
    """A reconcile still running while the operator stops registers its fleet after the loops were
    closed: nothing starts then, so nothing outlives the operator."""
    loops = BudgetLoops(period=PERIOD, push_timeout=1, probe_timeout=2)
    await loops.close()
    target = DatabaseTarget(host=labdb.host, port=labdb.port, dbname="app", user="postgres", password="")

    async def pods() -> dict[str, str]:
        return {}

    loops.register(Fleet(name="late", token=TOKEN, pods=pods, role=FLEET_ROLE, database="app"), target)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("budget ")]
    await loops.close()
