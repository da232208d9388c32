"""`workers: N`: one pooler made of N processes sharing listen_port, seen from outside.

Every test runs the real `pgfleet-pooler` (a supervisor and two worker processes) in
front of the session's PostgreSQL, and checks what a user relies on:
- the pool limits hold for the whole pooler, not per process (pg_stat_activity says so);
- a cancel request reaches its query whichever worker the kernel hands it to;
- the HTTP port, signals and the config apply to all workers at once;
- a worker that dies comes back, with the limits in force;
- the admin console refuses commands that would change one worker only.

The kernel spreads connections among the workers (SO_REUSEPORT), so a test that needs a
client on a given worker connects until it has one: the cancel key's process id tells the
worker (pid % workers == index).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import asyncpg
import psycopg
import pytest
import yaml
from pgfleet.devtools.procs import descendants, port_open, stat_fields
from pgfleet.devtools.tempdb import TempPostgres, free_port
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.startup import build_cancel_request, build_startup_message
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PoolerProcess, own_app
from .rawpg import RawClient, error, rows

WORKERS = 2
TOKEN = "workers-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUERY_CANCELED = "57014"
FEATURE_NOT_SUPPORTED = "0A000"


# -- the pooler under test ---------------------------------------------------------------------------


@dataclass
class Fleet:
    """A running multi-worker pooler: its supervisor process, its HTTP port, the test's clients."""

    proc: PoolerProcess
    base: str  # http://host:port of the supervisor's HTTP port
    opened: list[asyncpg.Connection | psycopg.AsyncConnection[Any]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.proc.port)

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres", database="app", **kwargs)
        self.opened.append(conn)
        return conn

    async def connect_psycopg(self, dbname: str = "app") -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True
        )
        self.opened.append(conn)
        return conn

    async def close_clients(self) -> None:
        for conn in self.opened:
            if isinstance(conn, asyncpg.Connection):
                conn.terminate()  # also fine on a connection the pooler already closed
            else:
                await conn.close()

    def workers(self) -> dict[int, tuple[int, list[str]]]:
        """Worker index → (pid, argv), read from /proc (the supervisor's living children)."""
        found = {}
        for pid in descendants(self.proc.proc.pid)[1:]:
            try:
                # A worker names itself (setproctitle): one string, its words apart by spaces.
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
            except OSError:
                continue  # gone meanwhile
            if "--worker" in argv:  # a zombie's cmdline is empty: a dead worker is not listed
                index = int(argv[argv.index("--worker") + 1].split("/")[0])
                found[index] = (pid, argv)
        return found

    def control_dir(self) -> Path:
        """The supervisor's private directory (pgfleet-workers-*), from a worker's command line."""
        _, argv = self.workers()[0]
        return Path(argv[argv.index("--control-dir") + 1])


StartFleet = Callable[..., Fleet]


@pytest.fixture
async def fleet(pooler_process: Callable[..., PoolerProcess], tmp_path: Path) -> AsyncIterator[StartFleet]:
    """Start `pgfleet-pooler` with workers=2, trust auth and the HTTP port (with a token)."""
    started: list[Fleet] = []

    def start(**settings: Any) -> Fleet:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        http_port = free_port()
        settings = {
            "workers": WORKERS,
            "auth_type": "trust",
            "http_listen_addr": "127.0.0.1",
            "http_listen_port": http_port,
            "http_token_file": str(token_file),
            **settings,
        }
        # "ready on" is printed once every worker answers and the HTTP port is open.
        started.append(Fleet(pooler_process(**settings), f"http://127.0.0.1:{http_port}"))
        return started[-1]

    yield start
    # Before pooler_process stops the pooler, so that a failed test leaves no client open.
    for fleet in started:
        await fleet.close_clients()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def app_pool(status: dict[str, Any]) -> dict[str, Any]:
    """The app/postgres pool in a /status (the whole pooler's or one worker's)."""
    pools: list[dict[str, Any]] = [p for p in status["pools"] if (p["database"], p["user"]) == ("app", "postgres")]
    assert len(pools) == 1, status["pools"]
    return pools[0]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5, what: str = "condition") -> None:
    """wait_until for a condition that needs I/O to evaluate (HTTP, SQL)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        if loop.time() > end:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.02)


# -- clients -----------------------------------------------------------------------------------------


def owner(pid: int) -> int:
    """The worker that handed out this cancel key's process id."""
    return pid % WORKERS


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def on_each_worker(connect: Callable[[], Awaitable[C]], pid_of: Callable[[C], int], count: int) -> list[list[C]]:
    """`count` connections on every worker, by worker index (the kernel picks; we keep connecting)."""
    by_worker: list[list[C]] = [[] for _ in range(WORKERS)]
    extra: list[C] = []
    for _ in range(40 * count * WORKERS):
        if all(len(group) >= count for group in by_worker):
            break
        conn = await connect()
        group = by_worker[owner(pid_of(conn))]
        (group if len(group) < count else extra).append(conn)
    else:
        raise AssertionError(f"the kernel never spread {count} connections on each worker")
    for conn in extra:
        await conn.close()
    return by_worker


def asyncpg_pid(conn: asyncpg.Connection) -> int:
    return int(conn.get_server_pid())  # the pooler's BackendKeyData, not PostgreSQL's


def psycopg_pid(conn: psycopg.AsyncConnection[Any]) -> int:
    return conn.info.backend_pid


@dataclass
class RawSession:
    """A raw-protocol client with the cancel key the pooler gave it."""

    client: RawClient
    pid: int
    key: int


async def raw_session(port: int) -> RawSession:
    # rawpg.RawClient.connect drops the startup replies; the BackendKeyData is among them.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    client.send(build_startup_message({"user": "postgres", "database": "app"}))
    (key_data,) = [body for kind, body in await client.until_ready() if kind == "K"]
    return RawSession(client, *backend.parse_backend_key_data(key_data))


async def send_cancel(path: Path, pid: int, key: int) -> None:
    """A CancelRequest on a worker's private socket, as a sibling worker passes one on."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(build_cancel_request(pid, key))
    await writer.drain()
    await reader.read()  # the worker closes the connection once it has taken the request
    writer.close()
    await writer.wait_closed()


# -- PostgreSQL's own count ----------------------------------------------------------------------------


class Backends:
    """pg_stat_activity for one database, straight from PostgreSQL: now, and the peak seen while sampling."""

    def __init__(self, conn: asyncpg.Connection, dbname: str) -> None:
        self.conn = conn
        self.dbname = dbname
        self.peak = 0
        self._lock = asyncio.Lock()  # one asyncpg connection, one query at a time
        self._sampler: asyncio.Task[None] | None = None

    async def count(self, running: str | None = None) -> int:
        """Client backends on the database; only those running the query `running` if given."""
        sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = $1"
        args: list[str] = [self.dbname]
        if running is not None:
            sql += " AND state = 'active' AND query = $2"
            args.append(running)
        async with self._lock:
            count = int(await self.conn.fetchval(sql, *args))
        self.peak = max(self.peak, count)
        return count

    async def wait_for(
        self, predicate: Callable[[int], bool], what: str, running: str | None = None, timeout: float = 5
    ) -> None:
        async def check() -> bool:
            return predicate(await self.count(running))

        await eventually(check, timeout, what)

    def start_sampling(self) -> None:
        async def sample() -> None:
            while True:
                await self.count()
                await asyncio.sleep(0.005)

        self._sampler = asyncio.create_task(sample())

    async def stop_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None


@pytest.fixture
async def backends(pg: TempPostgres, fresh_db: str) -> AsyncIterator[Backends]:
    """Backends of `fresh_db` (point the pooler's app there with `own_app(pg, fresh_db)`)."""
    conn = await asyncpg.connect(pg.dsn())
    counter = Backends(conn, fresh_db)
    yield counter
    await counter.stop_sampling()
    await conn.close()


class Load:
    """Clients looping over short transactions until stopped; a client stops at its first failure."""

    def __init__(self, conns: list[asyncpg.Connection], sql: str = "SELECT pg_sleep(0.005)") -> None:
        self.sql = sql
        self.done = 0
        self.failures: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(conn)) for conn in conns]

    async def _client(self, conn: asyncpg.Connection) -> None:
        while not self._stop.is_set():
            try:
                async with conn.transaction():
                    await conn.execute(self.sql)
                    assert await conn.fetchval("SELECT 1") == 1
                self.done += 1
            except Exception as exc:  # a failed transaction is a test failure, reported at the end
                self.failures.append(exc)
                return  # a broken connection would fail again at once, without yielding to the loop

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def wait_closed(conn: asyncpg.Connection, timeout: float = 5) -> None:
    await wait_until(conn.is_closed, timeout)


# -- limits are the whole pooler's -----------------------------------------------------------------------


async def test_many_clients_never_exceed_the_pool_size_of_the_whole_pooler(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends, http: aiohttp.ClientSession
) -> None:
    """40 clients, default_pool_size 6 over 2 workers: thousands of transactions, never > 6 backends."""
    f = fleet(default_pool_size=6, databases=own_app(pg, fresh_db))
    # asyncpg's default statement cache: named prepared statements, on whichever server.
    conns = list(await asyncio.gather(*(f.connect() for _ in range(40))))
    assert {owner(asyncpg_pid(conn)) for conn in conns} == {0, 1}

    async def client(conn: asyncpg.Connection, seed: int) -> int:
        for i in range(60):
            async with conn.transaction():
                assert await conn.fetchval("SELECT $1::int * 2", seed + i) == 2 * (seed + i)
                assert await conn.fetchval("SELECT $1::text || 'x'", str(i)) == f"{i}x"
        return 60

    backends.start_sampling()
    done = await asyncio.gather(*(client(conn, 1000 * n) for n, conn in enumerate(conns)))
    await backends.stop_sampling()
    assert sum(done) == 2400
    # Each worker opened its share (3) and no more; together they used the whole budget.
    assert backends.peak == 6

    status = await get_json(http, f"{f.base}/status")
    assert app_pool(status)["limits"]["pool_size"] == 6
    assert app_pool(status)["totals"]["xact_count"] >= 2400
    assert [w["index"] for w in status["workers"]] == [0, 1]
    for worker in status["workers"]:
        pool = app_pool(worker["status"])
        assert pool["limits"]["pool_size"] == 3
        assert pool["totals"]["xact_count"] > 0  # both workers carried traffic
        assert pool["servers"]["idle"] + pool["servers"]["active"] <= 3
    assert status["clients"] == 40
    for conn in conns:
        await conn.close()


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgfleet.pooler", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("default_pool_size: 1", "default_pool_size"),
        ("max_client_conn: 1", "max_client_conn"),
        ("databases: {app: {host: h, pool_size: 1}}", "databases.app.pool_size"),
        ("users: {u: {max_user_connections: 1}}", "users.u.max_user_connections"),
    ],
)
def test_a_limit_below_the_worker_count_is_refused(tmp_path: Path, setting: str, key: str) -> None:
    """A limit of 1 over 2 workers would leave one worker with none: the config names the key."""
    path = tmp_path / "pooler.yaml"
    path.write_text(f"auth_type: trust\nworkers: 2\n{setting}\n")
    result = check_config(path)
    assert result.returncode != 0
    assert key in result.stderr and "workers" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # The same limit is fine when every worker gets at least one.
    path.write_text(f"auth_type: trust\nworkers: 2\n{setting.replace(': 1', ': 2')}\n")
    result = check_config(path)
    assert result.returncode == 0, result.stderr


def private_and_resident_kib(pid: int) -> tuple[int, int]:
    """(USS, RSS) of a process in KiB: its pages no other process maps, and all it maps."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Rss"]


async def test_workers_share_the_loaded_pooler_instead_of_each_loading_it(fleet: StartFleet) -> None:
    """Forked from a process that loaded Python and the pooler once, a worker keeps most of
    its memory shared: loaded afresh, each had over 60 % of its resident pages to itself."""
    f = fleet()
    clients = [c for group in await on_each_worker(f.connect, asyncpg_pid, 1) for c in group]
    assert len(clients) == WORKERS  # both workers have served a client
    for pid, _ in f.workers().values():
        private, resident = private_and_resident_kib(pid)
        assert private < resident * 0.4, f"worker {pid}: {private} KiB of {resident} KiB private"


# -- cancel requests --------------------------------------------------------------------------------------


async def test_driver_cancel_stops_queries_on_both_workers(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends
) -> None:
    """libpq's cancel opens a new connection, which may land on either worker: it works either way."""
    f = fleet(default_pool_size=8, databases=own_app(pg, fresh_db))
    groups = await on_each_worker(f.connect_psycopg, psycopg_pid, 3)
    conns = [conn for group in groups for conn in group]
    queries = [asyncio.create_task(conn.execute("SELECT pg_sleep(30)")) for conn in conns]
    # Cancel only once every query runs on a server (before that there is nothing to cancel).
    await backends.wait_for(lambda n: n == 6, "6 queries running", running="SELECT pg_sleep(30)")

    loop = asyncio.get_running_loop()
    started = loop.time()
    for conn, query in zip(conns, queries, strict=True):
        await conn.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(query, 5)
    assert loop.time() - started < 5
    # Each connection carries on after its cancelled query.
    for conn in conns:
        assert await (await conn.execute("SELECT 7")).fetchone() == (7,)
        await conn.close()


async def test_cancel_request_on_the_wrong_worker_is_passed_to_the_owner(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends
) -> None:
    """A CancelRequest taken by worker j for a client of worker i reaches worker i, key checked."""
    f = fleet(databases=own_app(pg, fresh_db))
    session = await raw_session(f.port)
    other = 1 - owner(session.pid)
    other_socket = f.control_dir() / f"worker-{other}.sock"
    assert other_socket.is_socket()

    session.client.send(frontend.query("SELECT pg_sleep(30)"))
    await backends.wait_for(lambda n: n == 1, "the query running", running="SELECT pg_sleep(30)")

    # A wrong secret key is passed on too, and the owner ignores it as PostgreSQL would.
    await send_cancel(other_socket, session.pid, session.key ^ 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session.client.message(), 0.3)
    assert await backends.count(running="SELECT pg_sleep(30)") == 1

    await send_cancel(other_socket, session.pid, session.key)
    replies = await asyncio.wait_for(session.client.until_ready(), 5)
    assert error(replies)["C"] == QUERY_CANCELED
    # The client's session goes on.
    session.client.send(frontend.query("SELECT 5"))
    assert rows(await session.client.until_ready()) == [["5"]]
    await session.client.close()


# -- the HTTP port ------------------------------------------------------------------------------------------


async def test_put_limits_lowers_backends_of_all_workers_under_load(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends, http: aiohttp.ClientSession
) -> None:
    """40 busy clients on default_pool_size 8; PUT 4: ≤ 4 backends in all within 3 s, no failure."""
    f = fleet(default_pool_size=8, query_wait_timeout=30, databases=own_app(pg, fresh_db))
    url = f"{f.base}/limits"
    conns = list(await asyncio.gather(*(f.connect(statement_cache_size=0) for _ in range(40))))
    load = Load(conns)
    try:
        # More than one worker's share (4) open at once: both workers are busy.
        await backends.wait_for(lambda n: n >= 7, "load on both workers")

        # Refused: no token, a limit that leaves a worker with none, a wrong type. Nothing changes.
        async with http.put(url, json={"default_pool_size": 4}) as response:
            assert response.status == 401
        async with http.put(url, json={"default_pool_size": 1}, headers=AUTH) as response:
            assert response.status == 400
            message = (await response.json())["error"]
            assert "default_pool_size" in message and "workers" in message
        async with http.put(url, json={"default_pool_size": "4"}, headers=AUTH) as response:
            assert response.status == 400
            assert "non-negative integer" in (await response.json())["error"]
        status = await get_json(http, f"{f.base}/status")
        assert status["limits"]["default_pool_size"] == 8
        assert [app_pool(w["status"])["limits"]["pool_size"] for w in status["workers"]] == [4, 4]

        async with http.put(url, json={"default_pool_size": 4}, headers=AUTH) as response:
            assert response.status == 200
            data = await response.json()
        assert data["default_pool_size"] == 4
        # Each worker answers with its own share.
        assert [app_pool(reply)["pool_size"] for reply in data["workers"]] == [2, 2]

        await backends.wait_for(lambda n: n <= 4, "backends down to 4", timeout=3)
        before = load.done
        for _ in range(10):  # and it stays there while the load goes on
            assert await backends.count() <= 4
            await asyncio.sleep(0.02)
        await wait_until(lambda: load.done > before + 20)
    finally:
        await load.finish()
    assert load.failures == []
    status = await get_json(http, f"{f.base}/status")
    assert app_pool(status)["limits"]["pool_size"] == 4
    for conn in conns:
        await conn.close()


async def test_metrics_label_every_worker_and_drain_flips_readyz(
    fleet: StartFleet, http: aiohttp.ClientSession
) -> None:
    f = fleet()
    groups = await on_each_worker(f.connect, asyncpg_pid, 1)
    (first,), (second,) = groups
    for conn in (first, second):
        assert await conn.fetchval("SELECT 1") == 1
    transaction = first.transaction()
    await transaction.start()
    await first.execute("SELECT 2")

    async with http.get(f"{f.base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            # One series per worker: a duplicate would be rejected by Prometheus.
            assert (sample.name, labels) not in samples, (sample.name, labels)
            samples[(sample.name, labels)] = sample.value
    for worker in ("0", "1"):
        assert samples[("pgbouncer_up", (("worker", worker),))] == 1
        pool = (("database", "app"), ("user", "postgres"), ("worker", worker))
        assert samples[("pgbouncer_pools_client_active_connections", pool)] == 1
        # default_pool_size 5 over 2 workers: 3 + 2, the remainder to the first.
        assert samples[("pgfleet_pool_server_limit", pool)] == {"0": 3, "1": 2}[worker]
    # Summed over the label, the pooler's totals.
    in_use = [samples[("pgbouncer_pools_server_active_connections", (("database", "app"), ("user", "postgres"), ("worker", w)))] for w in "01"]  # fmt: skip
    assert sum(in_use) == 1  # the open transaction holds one server
    assert all("worker" in dict(labels) for _, labels in samples)  # every sample says its worker

    async with http.get(f"{f.base}/readyz") as response:
        assert response.status == 200 and (await response.json())["ready"] is True
    async with http.post(f"{f.base}/drain") as response:
        assert response.status == 401
    async with http.post(f"{f.base}/drain", headers=AUTH) as response:
        assert response.status == 202
    # Not ready from the moment the drain starts, while the transaction is still open.
    async with http.get(f"{f.base}/readyz") as response:
        assert response.status == 503 and (await response.json())["ready"] is False
    await wait_closed(second)  # idle: closed at once
    assert await first.fetchval("SELECT 3") == 3
    await transaction.commit()
    await wait_closed(first)
    assert await asyncio.to_thread(f.proc.proc.wait, 10) == 0


# -- signals and the workers' life ----------------------------------------------------------------------------


async def test_sigterm_drains_every_worker_without_losing_a_transaction(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str
) -> None:
    f = fleet(default_pool_size=4, shutdown_timeout=20, databases=own_app(pg, fresh_db))
    await asyncio.to_thread(pg.sql, "CREATE TABLE drained (id int)", fresh_db)
    busy = [c for group in await on_each_worker(f.connect, asyncpg_pid, 2) for c in group]
    idle = [c for group in await on_each_worker(f.connect, asyncpg_pid, 1) for c in group]
    transactions = [conn.transaction() for conn in busy]
    for i, (conn, tx) in enumerate(zip(busy, transactions, strict=True)):
        await tx.start()
        await conn.execute("INSERT INTO drained VALUES ($1)", i)

    f.proc.signal(signal.SIGTERM)
    # Idle clients are closed at once. A worker stops listening before it closes them,
    # so once both are gone nobody new gets in on either worker.
    for conn in idle:
        await wait_closed(conn)
    assert not port_open("127.0.0.1", f.port)
    # Clients inside a transaction finish it (nothing in flight is lost), then are closed.
    for i, (conn, tx) in enumerate(zip(busy, transactions, strict=True)):
        await conn.execute("INSERT INTO drained VALUES ($1)", i + 10)
        await tx.commit()
    for conn in busy:
        await wait_closed(conn)
    assert await asyncio.to_thread(f.proc.proc.wait, 10) == 0
    assert f.workers() == {}
    assert await asyncio.to_thread(pg.sql, "SELECT count(*) FROM drained", fresh_db) == "8"


async def test_killed_worker_is_restarted_with_the_limits_in_force(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends, http: aiohttp.ClientSession
) -> None:
    f = fleet(default_pool_size=12, databases=own_app(pg, fresh_db))
    async with http.put(f"{f.base}/limits", json={"default_pool_size": 8}, headers=AUTH) as response:
        assert response.status == 200
    (survivor,), (victim,) = await on_each_worker(f.connect, asyncpg_pid, 1)
    old_pid, _ = f.workers()[1]

    os.kill(old_pid, signal.SIGKILL)
    # Its clients lose their connection (the process is gone); the other worker's do not.
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError, asyncpg.InterfaceError)):
        await asyncio.wait_for(victim.fetchval("SELECT 1"), 5)
    assert await survivor.fetchval("SELECT 1") == 1

    # While it is down (a restart waits a second): not healthy, not ready.
    async def worker_down() -> bool:
        async with http.get(f"{f.base}/healthz") as response:
            return response.status == 503 and (await response.json())["workers_down"] == [1]

    await eventually(worker_down, what="healthz reporting worker 1 down")
    async with http.get(f"{f.base}/readyz") as response:
        assert response.status == 503
    # A PUT now reaches only the living worker and says so; the other gets it when it is back.
    async with http.put(f"{f.base}/limits", json={"default_pool_size": 4}, headers=AUTH) as response:
        assert response.status == 502
        data = await response.json()
    assert list(data["failed"]) == ["1"] and data["default_pool_size"] == 4

    async def restarted() -> bool:
        worker = (await get_json(http, f"{f.base}/status"))["workers"][1]
        # Counted, answering, and given the limits set by PUT since the file was read.
        return bool(
            worker["restarts"] == 1
            and worker["status"] is not None
            and worker["status"]["limits"]["default_pool_size"] == 4
        )

    await eventually(restarted, timeout=60, what="worker 1 restarted with default_pool_size 4")
    async with http.get(f"{f.base}/healthz") as response:
        assert response.status == 200
    new_pid, _ = f.workers()[1]
    assert new_pid != old_pid

    # New clients land on both workers again, and the restarted one keeps to its share (2).
    groups = await on_each_worker(f.connect, asyncpg_pid, 4)
    conns = [conn for group in groups for conn in group]
    backends.start_sampling()
    load = Load(conns, "SELECT pg_sleep(0.01)")
    await wait_until(lambda: load.done >= 100)
    await load.finish()
    await backends.stop_sampling()
    assert load.failures == []
    assert backends.peak <= 4
    status = await get_json(http, f"{f.base}/status")
    assert [app_pool(w["status"])["limits"]["pool_size"] for w in status["workers"]] == [2, 2]
    assert app_pool(status["workers"][1]["status"])["totals"]["xact_count"] > 0
    assert status["workers"][0]["restarts"] == 0
    for conn in [*conns, survivor]:
        await conn.close()
    victim.terminate()


async def test_sighup_reloads_every_worker(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, backends: Backends, http: aiohttp.ClientSession
) -> None:
    """default_pool_size 4 → 8 in the file and SIGHUP: clients waiting for a server get one."""
    f = fleet(default_pool_size=4, query_wait_timeout=30, databases=own_app(pg, fresh_db))
    groups = await on_each_worker(lambda: f.connect(statement_cache_size=0), asyncpg_pid, 4)
    conns = [conn for group in groups for conn in group]
    # Each client opens a transaction and keeps its server: 2 per worker get one, 2 wait.
    begins = [asyncio.create_task(conn.execute("BEGIN; SELECT 1")) for conn in conns]
    await backends.wait_for(lambda n: n == 4, "4 backends")

    async def four_waiting() -> bool:
        return bool(app_pool(await get_json(http, f"{f.base}/status"))["clients"]["waiting"] == 4)

    await eventually(four_waiting, what="4 clients waiting")
    assert app_pool(await get_json(http, f"{f.base}/status"))["limits"]["pool_size"] == 4

    settings = yaml.safe_load(f.proc.config_path.read_text())
    settings["default_pool_size"] = 8
    f.proc.config_path.write_text(yaml.safe_dump(settings))
    f.proc.signal(signal.SIGHUP)

    await asyncio.wait_for(asyncio.gather(*begins), 5)
    assert await backends.count() == 8
    status = await get_json(http, f"{f.base}/status")
    assert status["limits"]["default_pool_size"] == 8
    assert app_pool(status)["limits"]["pool_size"] == 8
    assert [app_pool(w["status"])["limits"]["pool_size"] for w in status["workers"]] == [4, 4]
    for conn in conns:
        await conn.execute("ROLLBACK")
        await conn.close()


async def test_a_worker_started_again_after_a_reload_runs_the_file_as_reloaded(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, http: aiohttp.ClientSession
) -> None:
    """Workers take the config the supervisor read at start while the file still says that: one
    that dies after the file changed and was reloaded comes back with the reloaded settings."""
    f = fleet(default_pool_size=4, databases=own_app(pg, fresh_db))

    async def pool_sizes() -> list[int]:
        status = await get_json(http, f"{f.base}/status")
        return [app_pool(w["status"])["limits"]["pool_size"] for w in status["workers"] if w["status"] is not None]

    await on_each_worker(f.connect, asyncpg_pid, 1)  # the app pool exists on both workers
    assert await pool_sizes() == [2, 2]
    settings = yaml.safe_load(f.proc.config_path.read_text())
    settings["default_pool_size"] = 8
    f.proc.config_path.write_text(yaml.safe_dump(settings))
    f.proc.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return await pool_sizes() == [4, 4]

    await eventually(reloaded, what="both workers at pool_size 4 (8 / 2)")
    old_pid, _ = f.workers()[1]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        worker = (await get_json(http, f"{f.base}/status"))["workers"][1]
        return bool(worker["restarts"] == 1 and worker["status"] is not None)

    await eventually(restarted, timeout=60, what="worker 1 started again")
    await on_each_worker(f.connect, asyncpg_pid, 1)
    assert await pool_sizes() == [4, 4]
    await f.close_clients()


def gone(pid: int) -> bool:
    """True once a process has exited (a zombie nobody reaped counts as gone)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"


async def test_workers_do_not_outlive_a_killed_supervisor(fleet: StartFleet) -> None:
    """A worker left alone would hold the port with nobody to stop or restart it."""
    f = fleet()
    clients = [c for group in await on_each_worker(f.connect, asyncpg_pid, 1) for c in group]
    workers = f.workers()
    control_dir = f.control_dir()
    assert sorted(workers) == [0, 1]

    f.proc.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    # The kernel tells each worker (parent-death signal SIGTERM): they drain and exit.
    for conn in clients:
        await wait_closed(conn)
    await wait_until(lambda: all(gone(pid) for pid, _ in workers.values()), timeout=5)
    assert not port_open("127.0.0.1", f.port)
    shutil.rmtree(control_dir, ignore_errors=True)  # the supervisor had no chance to remove it


def reload_settled(log: str) -> bool:
    """The supervisor refused the file (and kept it from the workers), or every worker applied or refused it."""
    lines = log.splitlines()
    if any("pgfleet.supervisor: reload failed" in line for line in lines):
        return True
    return all(
        any(f"[worker {i}/{WORKERS}]" in line and ("configuration reloaded" in line or "reload failed" in line)
            for line in lines)
        for i in range(1, WORKERS + 1)
    )  # fmt: skip


async def test_sighup_never_leaves_a_worker_without_a_server(fleet: StartFleet, http: aiohttp.ClientSession) -> None:
    """The file says workers: 1 (for the next restart) and default_pool_size: 1, which 2 running
    workers cannot share: the reload is refused and every worker keeps its servers."""
    f = fleet(default_pool_size=4)
    for (conn,) in await on_each_worker(f.connect, asyncpg_pid, 1):
        assert await conn.fetchval("SELECT 1") == 1  # the pool exists on both workers

    settings = yaml.safe_load(f.proc.config_path.read_text())
    settings.update(workers=1, default_pool_size=1)
    f.proc.config_path.write_text(yaml.safe_dump(settings))
    logged = len(f.proc.log())
    f.proc.signal(signal.SIGHUP)
    await wait_until(lambda: reload_settled(f.proc.log()[logged:]))

    # Refusing the reload or not: every worker must keep at least one server for its clients.
    status = await get_json(http, f"{f.base}/status")
    shares = [app_pool(w["status"])["limits"]["pool_size"] for w in status["workers"]]
    assert min(shares) >= 1, shares
    for (conn,) in await on_each_worker(f.connect, asyncpg_pid, 1):
        assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 3) == 2


# -- the admin console ------------------------------------------------------------------------------------------


async def test_admin_console_shows_its_worker_and_refuses_changes(fleet: StartFleet) -> None:
    f = fleet(admin_users=["postgres"])
    # One app client on worker 0, two on worker 1: each console shows its own worker's.
    first, second = await on_each_worker(f.connect_psycopg, psycopg_pid, 2)
    await first.pop().close()
    app_clients = [*first, *second]
    for conn in app_clients:
        await conn.execute("SELECT 1")
    consoles = await on_each_worker(lambda: f.connect_psycopg("pgbouncer"), psycopg_pid, 1)

    for index, (admin,) in enumerate(consoles):
        cur = await admin.execute("SHOW POOLS")
        assert cur.description is not None
        columns = [col.name for col in cur.description]
        pools = {(row[0], row[1]): dict(zip(columns, row, strict=True)) for row in await cur.fetchall()}
        assert pools[("app", "postgres")]["cl_active"] == index + 1

        for command in ("SET default_pool_size = 3", "PAUSE", "RESUME", "RELOAD", "KILL app", "SHUTDOWN"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
                await admin.execute(command)
            assert caught.value.sqlstate == FEATURE_NOT_SUPPORTED
            assert f"worker {index + 1} of 2" in str(caught.value), command
        # The console stays usable, and nothing was changed.
        cur = await admin.execute("SHOW CONFIG")
        config = {row[0]: row[1] for row in await cur.fetchall()}
        assert config["default_pool_size"] == "5"
        await admin.close()
    for conn in app_clients:
        assert await (await conn.execute("SELECT 2")).fetchone() == (2,)  # not paused, not killed
        await conn.close()


async def test_a_worker_started_again_takes_the_pause_in_force_not_the_files(
    fleet: StartFleet, pg: TempPostgres, fresh_db: str, http: aiohttp.ClientSession
) -> None:
    """start_paused is the first state only: a worker that dies after a RESUME comes back serving,
    one that dies during a PUT /pause comes back paused."""
    f = fleet(start_paused=True, databases=own_app(pg, fresh_db))
    assert (await get_json(http, f"{f.base}/status"))["paused"] is True
    async with http.put(f"{f.base}/pause", json={"paused": False}, headers=AUTH) as response:
        assert response.status == 200 and (await response.json())["paused"] is False

    async def restarted(index: int, restarts: int) -> bool:
        worker = (await get_json(http, f"{f.base}/status"))["workers"][index]
        return bool(worker["restarts"] == restarts and worker["status"] is not None)

    old_pid, _ = f.workers()[1]
    os.kill(old_pid, signal.SIGKILL)
    await eventually(lambda: restarted(1, 1), timeout=60, what="worker 1 started again")
    status = await get_json(http, f"{f.base}/status")
    assert [w["status"]["paused"] for w in status["workers"]] == [False, False]
    groups = await on_each_worker(f.connect, asyncpg_pid, 2)
    for conn in (conn for group in groups for conn in group):
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 10) == 1

    async with http.put(f"{f.base}/pause", json={"paused": True}, headers=AUTH) as response:
        assert response.status == 200
    old_pid, _ = f.workers()[0]
    os.kill(old_pid, signal.SIGKILL)
    await eventually(lambda: restarted(0, 1), timeout=60, what="worker 0 started again")
    status = await get_json(http, f"{f.base}/status")
    assert [w["status"]["paused"] for w in status["workers"]] == [True, True] and status["paused"] is True
