"""A fleet on one machine, for the budget tests and `make demo`.

- `lab_database`: a throwaway PostgreSQL with a small max_connections, a database `app`,
  the fleet's role `fleet` and a role `other` for "another application";
- `start_fleet_pooler`: a real pooler process with its HTTP control port, starting at
  the floor (as the ConfigMap starts a pod);
- `Sampler`: pg_stat_activity every 100 ms, backends per role — the ground truth the
  invariants are checked against (the fleet's poolers log in as `fleet`, nobody else does);
- `Crowd`: clients through a pooler, each transaction counted, every error by SQLSTATE;
- `Grabber`: another application taking and releasing a block of direct connections.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from .procs import PoolerProcess, free_port, port_open, start_pgfleet
from .tempdb import TempPostgres

TOKEN = "fleet-lab-token"
FLEET_ROLE = "fleet"
OTHER_ROLE = "other"


def lab_database(max_connections: int = 50) -> TempPostgres:
    """Started; the caller cleans it up. superuser_reserved_connections is 3 (TempPostgres)."""
    pg = TempPostgres(max_connections=max_connections)
    pg.start()
    pg.sql(f"CREATE ROLE {FLEET_ROLE} LOGIN; CREATE ROLE {OTHER_ROLE} LOGIN")
    pg.sql("CREATE DATABASE app")
    return pg


@dataclass
class LabPooler:
    name: str
    process: PoolerProcess
    port: int
    http_port: int
    http_addr: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}:{self.http_port}"

    def stop(self) -> None:
        self.process.stop()


def start_fleet_pooler(
    pg: TempPostgres,
    workdir: Path,
    name: str,
    *,
    floor: int = 1,
    workers: int = 1,
    http_addr: str = "127.0.0.1",
    http_port: int | None = None,
    **settings: Any,
) -> LabPooler:
    """A pooler fronting `app` as role `fleet`, at the floor until the controller says otherwise.

    Its token is read from workdir/token (written with TOKEN unless it exists).
    """
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "token"
    if not token_file.exists():
        token_file.write_text(TOKEN + "\n")
    port = free_port()
    http_port = http_port or free_port()
    config: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "workers": workers,
        "auth_type": "trust",
        "pool_mode": "transaction",
        "max_client_conn": 5000,
        "default_pool_size": floor,
        "max_db_connections": floor,
        "query_wait_timeout": 60,
        "server_login_retry": 1,
        "log_connections": False,
        "log_disconnections": False,
        "http_listen_addr": http_addr,
        "http_listen_port": http_port,
        "http_token_file": str(token_file),
        "databases": {
            "app": {
                "host": pg.host,
                "port": pg.port,
                "dbname": "app",
                "user": FLEET_ROLE,
                "pool_size": floor,
                "max_db_connections": floor,
            }
        },
        **settings,
    }
    process = start_pgfleet(config, directory)
    # The PostgreSQL port is up; with workers the supervisor opens the control port after it.
    deadline = time.monotonic() + 30
    while not port_open(http_addr, http_port):
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{name}: the control port {http_addr}:{http_port} did not open in 30 s")
        time.sleep(0.02)
    return LabPooler(name, process, port, http_port, http_addr)


@dataclass
class Sample:
    at: float  # time.monotonic() when the answer was read
    by_role: dict[str, int]
    # time.monotonic() when the query was sent: the count is of a moment between sent and at.
    sent: float | None = None

    def count(self, role: str) -> int:
        return self.by_role.get(role, 0)

    @property
    def total(self) -> int:
        return sum(self.by_role.values())


# Backends per role; the operator's own connections (its budget loop's observer and its
# probe, which log in with the fleet's credentials) are not the poolers': "operator".
_SAMPLE_SQL = """
SELECT CASE WHEN application_name IN ('pgfleet-budget', 'pgfleet-operator') THEN 'operator'
            ELSE coalesce(usename, '') END AS role,
       count(*) AS n
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
 GROUP BY 1
"""


def budget_in_force(periods: Sequence[tuple[float, int]], sample: Sample) -> int | None:
    """The most a fleet may hold at the moment `sample` counted, by the budget loop's own clock.

    `periods`: each period's start (time.monotonic(), PeriodReport.started) and the
    fleet's budget then, in order. Every push of a period comes after its start, and a
    raise only into room the other pods leave, so from a period's start on the fleet holds
    at most its budget, or the previous period's while pods lowered at a squeeze close
    their busy servers (as their transactions end). The sample counted at a moment
    between sending its query and reading the answer: each period in force then, and the
    one before the first of them, may bound it. None: before the first period.
    """
    starts = [start for start, _ in periods]
    first = bisect.bisect_right(starts, sample.at if sample.sent is None else sample.sent) - 1
    last = bisect.bisect_right(starts, sample.at) - 1
    if last < 0:
        return None
    return max(budget for _, budget in periods[max(0, first - 1) : last + 1])


class Sampler:
    """pg_stat_activity every `interval` seconds over its own (superuser) connection."""

    def __init__(self, pg: TempPostgres, interval: float = 0.1) -> None:
        self.pg = pg
        self.interval = interval
        self.samples: list[Sample] = []
        self.gaps = 0  # periods without a sample (the server was down)
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.pg.dsn(), server_settings={"application_name": "sampler"})
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.pg.dsn(), server_settings={"application_name": "sampler"}, timeout=5
                    )
                sent = time.monotonic()
                rows = await self._conn.fetch(_SAMPLE_SQL)
            except Exception:
                # PostgreSQL restarting (or the connection left mid-operation by it): no sample
                # until it is back on a new connection (a superuser slot is kept for us).
                if self._conn is not None:
                    self._conn.terminate()
                self._conn = None
                self.gaps += 1
            else:
                self.samples.append(Sample(time.monotonic(), {r["role"]: int(r["n"]) for r in rows}, sent))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            try:
                await self._conn.close(timeout=5)
            except Exception:  # cancelled mid-query (asyncpg: "another operation is in progress")
                self._conn.terminate()

    async def first(self, what: Callable[[Sample], bool], timeout: float = 60) -> float:
        """Wait for a sample from now on that satisfies `what`; the moment it was read (monotonic)."""
        start = time.monotonic()
        while True:
            for sample in self.since(start):
                if what(sample):
                    return sample.at
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"no sample in {timeout} s satisfied {what}")
            await asyncio.sleep(self.interval / 2)

    def since(self, start: float, end: float | None = None) -> list[Sample]:
        return [s for s in self.samples if s.at >= start and (end is None or s.at <= end)]


@dataclass
class CrowdStats:
    transactions: int = 0
    connects: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # SQLSTATE (or exception name) -> count

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class Crowd:
    """Clients through one pooler: `steady` ones that keep a connection, or serverless ones
    that connect, run one or two transactions and leave."""

    def __init__(self, port: int, *, query: str = "SELECT pg_sleep(0.02)", stats: CrowdStats | None = None) -> None:
        self.port = port
        self.query = query
        self.stats = stats if stats is not None else CrowdStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._visitors: set[asyncio.Task[None]] = set()  # the serverless ones

    def _error(self, exc: BaseException) -> None:
        self.stats.errors[getattr(exc, "sqlstate", None) or type(exc).__name__] += 1

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="app", database="app", statement_cache_size=0, timeout=60
        )
        self.stats.connects += 1
        return conn

    async def _visit(
        self, conn: asyncpg.Connection | None, count: Callable[[], int], *, leave: bool
    ) -> asyncpg.Connection | None:
        """Connect unless `conn` is open, run `count()` transactions (each counted), close if
        `leave`. The connection to go on with; None once closed, or after a failure (counted
        by SQLSTATE, the connection terminated)."""
        try:
            if conn is None:
                conn = await self._connect()
            for _ in range(count()):
                async with conn.transaction():
                    await conn.execute(self.query)
                self.stats.transactions += 1
            if leave:
                await conn.close()
                return None
            return conn
        except asyncio.CancelledError:
            if conn is not None:
                conn.terminate()
            raise
        except Exception as exc:
            self._error(exc)
            if conn is not None:
                conn.terminate()
            return None

    async def _steady(self) -> None:
        conn = None
        while True:
            conn = await self._visit(conn, lambda: 1, leave=False)
            if conn is None:
                await asyncio.sleep(0.1)

    async def _serverless(self, rng: random.Random, pause: float) -> None:
        me = asyncio.current_task()
        while me not in self._stopping:
            await self._visit(None, lambda: rng.randint(1, 2), leave=True)
            await asyncio.sleep(rng.uniform(0, pause))

    def add_steady(self, count: int) -> None:
        self._tasks += [asyncio.create_task(self._steady()) for _ in range(count)]

    def add_serverless(self, count: int, pause: float = 0.05, seed: int = 0) -> None:
        rng = random.Random(seed)
        new = [asyncio.create_task(self._serverless(rng, pause)) for _ in range(count)]
        self._visitors.update(new)
        self._tasks += new

    async def stop(self, count: int | None = None, grace: float = 5.0) -> None:
        """Stop `count` clients (all by default): serverless ones after their visit, steady ones now."""
        count = len(self._tasks) if count is None else count
        stopping, self._tasks = self._tasks[:count], self._tasks[count:]
        self._stopping.update(stopping)
        # A serverless visit in progress ends by itself (cancelling asyncpg mid-connect
        # leaves noise); steady clients are cancelled at once.
        visiting = [task for task in stopping if task in self._visitors]
        if visiting:
            await asyncio.wait(visiting, timeout=grace)
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        self._stopping.difference_update(stopping)
        self._visitors.difference_update(stopping)

    @property
    def size(self) -> int:
        return len(self._tasks)


class Grabber:
    """Another application: direct connections as role `other`, taken as they become free."""

    def __init__(self, pg: TempPostgres) -> None:
        self.pg = pg
        self.conns: list[asyncpg.Connection] = []
        self.refused = 0

    async def grab(self, count: int, deadline: float) -> int:
        """Open connections until `count` are held or `deadline` (monotonic) passes; how many are held."""
        while len(self.conns) < count and time.monotonic() < deadline:
            try:
                self.conns.append(await asyncpg.connect(self.pg.dsn(OTHER_ROLE, "app"), timeout=5))
            except asyncpg.TooManyConnectionsError:
                self.refused += 1
                await asyncio.sleep(0.05)
        return len(self.conns)

    async def release(self) -> None:
        conns, self.conns = self.conns, []
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
