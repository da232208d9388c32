"""The HTTP control port: metrics, health, status, PUT /limits and POST /drain."""

from __future__ import annotations

import asyncio
import io
import math
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from pgfleet.devtools.tempdb import TempPostgres, free_port
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.http import start_http
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.stats import WAIT_BUCKETS, WaitHistogram
from prometheus_client.parser import text_string_to_metric_families

from .conftest import StartPooler

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

StartHttp = Callable[..., Awaitable[tuple[Pooler, str]]]


@pytest.fixture
async def http_pooler(start_pooler: StartPooler, tmp_path: Path) -> AsyncIterator[StartHttp]:
    """A pooler on the test's loop with its HTTP port; returns (pooler, base URL)."""
    runners: list[web.AppRunner] = []

    async def start(*, token: bool = True, **settings: Any) -> tuple[Pooler, str]:
        if token:
            token_file = tmp_path / "token"
            token_file.write_text(TOKEN + "\n")
            settings["http_token_file"] = str(token_file)
        pooler = await start_pooler(**settings)
        port = free_port()
        runners.append(await start_http(pooler, "127.0.0.1", port))
        return pooler, f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(pooler: Pooler, database: str = "app") -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database=database, statement_cache_size=0
    )


async def backends(dbname: str, pg: TempPostgres) -> int:
    """Client backends on `dbname` as PostgreSQL itself counts them."""
    conn = await asyncpg.connect(pg.dsn(dbname="postgres"))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = $1",
            dbname,
        )
        return int(count)
    finally:
        await conn.close()


async def test_metrics_scrape_parses_with_exporter_names(http_pooler: StartHttp, http: aiohttp.ClientSession) -> None:
    pooler, base = await http_pooler(auth_type="trust", default_pool_size=1)
    conns = [await connect(pooler) for _ in range(4)]
    # Four clients on one server: some of them wait, which feeds the histogram.
    await asyncio.gather(*(conn.execute("SELECT pg_sleep(0.02)") for conn in conns))
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    pool = (("database", "app"), ("user", "postgres"))
    assert samples[("pgbouncer_up", ())] == 1
    assert samples[("pgbouncer_pools_client_active_connections", pool)] == 4
    assert samples[("pgbouncer_pools_client_waiting_connections", pool)] == 0
    assert samples[("pgbouncer_pools_server_idle_connections", pool)] == 1
    assert samples[("pgbouncer_pools_server_active_connections", pool)] == 0
    assert samples[("pgbouncer_stats_totals_sql_transactions_pooled_total", (("database", "app"),))] >= 4
    assert samples[("pgbouncer_stats_totals_queries_pooled_total", (("database", "app"),))] >= 4
    assert families["pgbouncer_stats_totals_sql_transactions_pooled"].type == "counter"
    db_labels = (("database", "app"), ("force_user", ""), ("host", "127.0.0.1"), ("name", "app"), ("pool_mode", ""))
    assert any(name == "pgbouncer_databases_pool_size" and labels[:2] == db_labels[:2] for name, labels in samples)
    assert samples[("pgbouncer_used_servers", ())] == 1
    assert samples[("pgbouncer_config_max_client_connections", ())] == 1000
    # pgfleet's own.
    assert families["pgfleet_client_wait_seconds"].type == "histogram"
    assert samples[("pgfleet_client_wait_seconds_count", pool)] >= 3
    assert samples[("pgfleet_client_wait_seconds_bucket", (*pool[:1], ("le", "+Inf"), *pool[1:]))] >= 3
    assert samples[("pgfleet_pool_server_limit", pool)] == 1
    assert samples[("pgfleet_pool_backends", pool)] == 1
    assert samples[("pgfleet_pool_clients_queued", pool)] == 0
    assert ("pgfleet_prepared_statements_cache_hits_total", pool) in samples
    assert ("pgfleet_prepared_statements_cache_misses_total", pool) in samples
    for conn in conns:
        await conn.close()


def test_wait_histogram_puts_every_wait_where_a_walk_over_all_bounds_does() -> None:
    """observe() starts its walk past the bounds a wait's whole 100 µs units clear: on a
    bound, just either side of one, and anywhere between, it must pick the bucket that
    comparing with every bound picks."""
    rng = random.Random(16)
    waits = [0.0, 1e-9, 0.00009999, 0.0001, 0.1, 0.1000001, 99.0, 1e9]
    for bound in WAIT_BUCKETS:
        waits += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf), bound * 1.01, bound * 0.99]
    waits += [rng.uniform(0, 0.12) for _ in range(5_000)] + [rng.expovariate(50) for _ in range(5_000)]
    for seconds in waits:
        histogram = WaitHistogram()
        histogram.observe(seconds)
        expected = next((i for i, bound in enumerate(WAIT_BUCKETS) if seconds <= bound), len(WAIT_BUCKETS))
        assert histogram.counts.index(1) == expected, seconds


def test_wait_histogram_buckets_are_prometheus_le() -> None:
    """A wait on a bucket's bound counts in that bucket (le: less than or equal), one past
    the last bound in +Inf; the cumulative view is what pgfleet_client_wait_seconds shows."""
    histogram = WaitHistogram()
    for seconds in (0.0, 0.0005, 0.0006, 0.001, 60.0, 61.0, 3600.0):
        histogram.observe(seconds)
    assert histogram.counts[:3] == [2, 2, 0]
    assert histogram.counts[len(WAIT_BUCKETS) - 1 :] == [1, 2]
    assert sum(histogram.counts) == 7
    assert histogram.total == pytest.approx(0.0005 + 0.0006 + 0.001 + 60.0 + 61.0 + 3600.0)
    cumulative = dict(histogram.cumulative())
    assert cumulative["0.0005"] == 2 and cumulative["0.001"] == 4 and cumulative["60.0"] == 5
    assert cumulative["+Inf"] == 7


async def test_healthz_and_readyz_flip_on_drain(http_pooler: StartHttp, http: aiohttp.ClientSession) -> None:
    pooler, base = await http_pooler(auth_type="trust")
    conn = await connect(pooler)
    transaction = conn.transaction()
    await transaction.start()
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 200 and (await response.json())["ready"] is True
    async with http.post(f"{base}/drain", headers=AUTH) as response:
        assert response.status == 202
    # Not ready from the instant the drain starts, while the transaction is still open.
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 503 and (await response.json()) == {"ready": False, "reason": "draining"}
    async with http.get(f"{base}/healthz") as response:
        assert response.status == 200
    assert await conn.fetchval("SELECT 41 + 1") == 42  # the transaction in flight carries on
    await transaction.commit()
    await wait_until(conn.is_closed, timeout=5)
    await pooler.wait_stopped()


async def test_status_reports_pools(http_pooler: StartHttp, http: aiohttp.ClientSession) -> None:
    pooler, base = await http_pooler(auth_type="trust", default_pool_size=3)
    conn = await connect(pooler)
    await conn.execute("SELECT 1")
    async with http.get(f"{base}/status") as response:
        assert response.status == 200
        data = await response.json()
    assert data["ready"] is True and data["draining"] is False
    (pool,) = data["pools"]
    assert (pool["database"], pool["user"], pool["mode"]) == ("app", "postgres", "transaction")
    assert pool["clients"] == {"active": 1, "waiting": 0}
    assert pool["servers"] == {"active": 0, "idle": 1, "used": 0, "login": 0}
    assert pool["limits"]["pool_size"] == 3 and pool["limits"]["limit"] == 3
    assert pool["totals"]["xact_count"] >= 1
    assert data["limits"]["default_pool_size"] == 3
    assert data["totals"]["servers_idle"] == 1
    await conn.close()


async def test_put_limits_refuses_bad_tokens_and_bodies(http_pooler: StartHttp, http: aiohttp.ClientSession) -> None:
    pooler, base = await http_pooler(auth_type="trust", default_pool_size=7)
    before = pooler.config
    url = f"{base}/limits"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        async with http.put(url, json={"default_pool_size": 1}, headers=headers) as response:
            assert response.status == 401, headers
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.post(f"{base}/drain", headers={"Authorization": "Bearer nope"}) as response:
        assert response.status == 401
    bad_bodies: list[tuple[Any, str]] = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "non-empty"),
        ({"default_pool_size": -1}, "non-negative integer"),
        ({"default_pool_size": "5"}, "non-negative integer"),
        ({"default_pool_size": True}, "non-negative integer"),
        ({"listen_port": 1}, "listen_port: not a limit"),
        ({"databases": {"app": {"host": "elsewhere"}}}, "databases.app.host: not a limit"),
        ({"databases": {"nosuchdb": {"pool_size": 2}}}, "no such database"),
        ({"databases": ["app"]}, "expected an object"),
        ({"min_pool_size": 50}, "min_pool_size must not exceed default_pool_size"),
        ({"default_pool_size": 2**63}, "less than or equal to 2147483647"),
        ({"max_client_conn": 1e30}, "non-negative integer"),
        ({"databases": {"app": {"pool_size": 2**31}}}, "less than or equal to 2147483647"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"default_pool_size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ]
    for body, reason in bad_bodies:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.put(url, headers=AUTH, **kwargs) as response:
            assert response.status == 400, body
            assert reason in (await response.json())["error"], body
    # A body over 1 MiB (sent in many chunks) is refused whole, never parsed in part.
    oversized = b'{"default_pool_size": 1, "pad": "' + b"x" * (1 << 20) + b'"}'
    async with http.put(url, headers=AUTH, data=io.BytesIO(oversized)) as response:
        assert response.status == 413
        assert "too large" in (await response.json())["error"]
    assert pooler.config is before  # nothing changed
    async with http.put(
        url, json={"default_pool_size": 4, "databases": {"app": {"pool_size": 2}}}, headers=AUTH
    ) as response:
        assert response.status == 200
        data = await response.json()
    assert data["default_pool_size"] == 4
    assert data["databases"]["app"] == {"pool_size": 2}
    assert pooler.config.default_pool_size == 4


async def test_writes_are_refused_without_a_token_file(http_pooler: StartHttp, http: aiohttp.ClientSession) -> None:
    pooler, base = await http_pooler(token=False, auth_type="trust")
    async with http.put(f"{base}/limits", json={"default_pool_size": 1}, headers=AUTH) as response:
        assert response.status == 403
        assert "http_token_file" in (await response.json())["error"]
    async with http.post(f"{base}/drain", headers=AUTH) as response:
        assert response.status == 403
    assert pooler.config.default_pool_size == 5 and not pooler.draining
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200  # reads stay open


async def test_put_limits_lowers_backends_under_load(
    pg: TempPostgres, http_pooler: StartHttp, http: aiohttp.ClientSession
) -> None:
    """100 busy clients on a pool of 20; PUT pool_size 5: ≤5 backends within 2 s, no failures."""
    # A database of its own, so that backends other tests leave closing do not count.
    exists = await asyncio.to_thread(pg.sql, "SELECT count(*) FROM pg_database WHERE datname = 'limitsload'")
    if exists == "0":
        await asyncio.to_thread(pg.sql, "CREATE DATABASE limitsload")
    pooler, base = await http_pooler(
        auth_type="trust",
        max_client_conn=200,
        query_wait_timeout=30,
        databases={"limitsload": {"host": pg.host, "port": pg.port, "pool_size": 20}},
    )
    stop = asyncio.Event()
    done = 0
    failures: list[BaseException] = []

    async def client() -> None:
        nonlocal done
        conn = await connect(pooler, "limitsload")
        try:
            while not stop.is_set():
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.005)")
                        assert await conn.fetchval("SELECT 1") == 1
                    done += 1
                except Exception as exc:  # every failed transaction is a test failure
                    failures.append(exc)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(client()) for _ in range(100)]
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while await backends("limitsload", pg) < 15:
            assert asyncio.get_running_loop().time() < deadline, "load never reached the pool size"
            await asyncio.sleep(0.05)
        assert await backends("limitsload", pg) <= 20
        async with http.put(
            f"{base}/limits", json={"databases": {"limitsload": {"pool_size": 5}}}, headers=AUTH
        ) as response:
            assert response.status == 200
            assert (await response.json())["databases"]["limitsload"]["pool_size"] == 5
        changed_at = asyncio.get_running_loop().time()
        while await backends("limitsload", pg) > 5:
            assert asyncio.get_running_loop().time() - changed_at < 2.0, "backends did not come down in time"
            await asyncio.sleep(0.02)
        # And it stays there while the load goes on.
        before = done
        for _ in range(10):
            assert await backends("limitsload", pg) <= 5
            await asyncio.sleep(0.05)
        assert done > before
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert failures == []
    assert done > 100
    assert pooler.pools[("limitsload", "postgres")].server_count <= 5


async def test_pooler_process_serves_http_and_drains_on_sigterm(
    pooler_process: Callable[..., Any], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    http_port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = pooler_process(
        auth_type="trust", http_listen_addr="127.0.0.1", http_listen_port=http_port, http_token_file=str(token_file)
    )
    base = f"http://127.0.0.1:{http_port}"
    for _ in range(200):  # the HTTP port opens right after the listener
        try:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
                break
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=proc.port, user="postgres", database="app", statement_cache_size=0
    )
    transaction = conn.transaction()
    await transaction.start()
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 200
    proc.signal(signal.SIGTERM)
    for _ in range(100):
        async with http.get(f"{base}/readyz") as response:
            if response.status == 503:
                break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("readyz never turned false after SIGTERM")
    await transaction.commit()
    await conn.close()
    await asyncio.to_thread(proc.proc.wait, 10)
    assert proc.proc.returncode == 0


async def test_status_reports_the_backend_pids_it_holds(
    pg: TempPostgres, fresh_db: str, http_pooler: StartHttp, http: aiohttp.ClientSession
) -> None:
    """The PIDs in /status are exactly the backends PostgreSQL shows for the pooler."""
    pooler, base = await http_pooler(
        auth_type="trust", databases={"app": {"host": pg.host, "port": pg.port, "dbname": fresh_db}}
    )
    conns = [await connect(pooler) for _ in range(3)]
    transactions = [conn.transaction() for conn in conns]
    for transaction in transactions:
        await transaction.start()  # three servers busy at once
    seen = {await conn.fetchval("SELECT pg_backend_pid()") for conn in conns}
    async with http.get(f"{base}/status") as response:
        data = await response.json()
    (pool,) = data["pools"]
    assert set(data["backend_pids"]) == set(pool["backend_pids"]) == seen
    server_side = await asyncio.to_thread(
        pg.sql, f"SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname = '{fresh_db}'"
    )
    assert {int(pid) for pid in server_side.split(",")} == seen
    assert data["maxwait_seconds"] == 0
    for transaction in transactions:
        await transaction.commit()
    for conn in conns:
        await conn.close()


async def wait_for_backends(pg: TempPostgres, dbname: str, ok: Callable[[int], bool], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not ok(count := await backends(dbname, pg)):
        assert asyncio.get_running_loop().time() < deadline, f"{count} backends on {dbname}"
        await asyncio.sleep(0.02)


async def test_put_max_db_connections_lowers_backends_live(
    pg: TempPostgres, fresh_db: str, http_pooler: StartHttp, http: aiohttp.ClientSession
) -> None:
    """max_db_connections pushed live closes idle servers above it now, busy ones as they return."""
    pooler, base = await http_pooler(
        auth_type="trust",
        databases={"app": {"host": pg.host, "port": pg.port, "dbname": fresh_db, "pool_size": 6}},
    )
    conns = [await connect(pooler) for _ in range(4)]
    transactions = [conn.transaction() for conn in conns]
    for conn, transaction in zip(conns, transactions, strict=True):
        await transaction.start()
        await conn.execute("SELECT 1")
    await transactions[0].commit()
    await transactions[1].commit()  # two idle, two busy
    async with http.put(f"{base}/limits", json={"databases": {"app": {"max_db_connections": 1}}}, headers=AUTH) as r:
        assert r.status == 200
    await wait_for_backends(pg, fresh_db, lambda n: n == 2)  # the idle ones went
    async with http.get(f"{base}/status") as response:
        data = await response.json()
    assert data["limits"]["databases"]["app"]["max_db_connections"] == 1  # the limit in force, for the operator
    assert data["pools"][0]["limits"]["max_db_connections"] == 1
    await transactions[2].commit()
    await transactions[3].commit()
    await wait_for_backends(pg, fresh_db, lambda n: n <= 1)
    # And the lowered cap holds under a burst.
    await asyncio.gather(*(conn.fetchval("SELECT pg_sleep(0.05)") for conn in conns))
    assert pooler.database_server_count("app") <= 1
    for conn in conns:
        await conn.close()


async def test_a_full_database_queues_clients_instead_of_failing_them(
    pg: TempPostgres, fresh_db: str, http_pooler: StartHttp, http: aiohttp.ClientSession
) -> None:
    """PostgreSQL's 53300 at server login is the budget moving, not the client's error: they wait."""
    role = f"capped_{fresh_db}"
    await asyncio.to_thread(pg.sql, f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
    try:
        pooler, base = await http_pooler(
            auth_type="trust",
            query_wait_timeout=30,
            databases={"app": {"host": pg.host, "port": pg.port, "dbname": fresh_db, "user": role, "pool_size": 5}},
        )
        conns = [await connect(pooler) for _ in range(5)]

        async def transaction(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                return int(await conn.fetchval("SELECT 1 FROM pg_sleep(0.3)"))

        results = await asyncio.gather(*(transaction(conn) for conn in conns), return_exceptions=True)
        assert results == [1] * 5  # nobody saw 53300
        async with http.get(f"{base}/status") as response:
            data = await response.json()
        assert data["pools"][0]["full_refusals"] >= 1  # the database did refuse, and the pooler waited
        assert pooler.database_server_count("app") <= 2
        for conn in conns:
            await conn.close()
    finally:
        await asyncio.to_thread(
            pg.sql, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        await wait_for_backends(pg, fresh_db, lambda n: n == 0)
        await asyncio.to_thread(pg.sql, f"DROP ROLE {role}")
