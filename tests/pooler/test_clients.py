"""Real clients through the pooler: psql, pgbench, asyncpg, psycopg."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import client_env, run_cmd

from .conftest import StartPooler, own_app


async def test_psql_runs_queries_through_the_pooler(start_pooler: StartPooler) -> None:
    pooler = await start_pooler()
    code, out, err = await run_cmd(
        "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "md5user", "app",
        "-c", "SELECT current_user, current_database()",
        env=client_env("md5pass"),
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == "md5user|app"


async def test_asyncpg_and_psycopg_through_the_pooler(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="scram-sha-256")
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app",
        statement_cache_size=0,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
            await conn.execute("INSERT INTO t VALUES (1), (2)")
            assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", dbname="app",
        prepare_threshold=None,
    ) as pconn:  # fmt: skip
        cur = await pconn.execute("SELECT %s::text || 'x'", ("a",))
        assert await cur.fetchone() == ("ax",)


async def test_many_clients_share_a_small_pool(pg: TempPostgres, start_pooler: StartPooler, fresh_db: str) -> None:
    """200 concurrent clients, a pool of 10: every transaction right, never over 10 backends."""
    pooler = await start_pooler(default_pool_size=10, auth_type="trust", databases=own_app(pg, fresh_db))
    await asyncio.to_thread(pg.sql, "CREATE TABLE IF NOT EXISTS counters (id int PRIMARY KEY, n int)", fresh_db)
    await asyncio.to_thread(
        pg.sql, "TRUNCATE counters; INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g", fresh_db
    )
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await asyncio.to_thread(pg.client_backends, None, fresh_db))
            await asyncio.sleep(0.05)

    async def client(i: int) -> int:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=pooler.port, user="postgres", database="app", statement_cache_size=0
        )
        try:
            for _ in range(15):
                async with conn.transaction():
                    await conn.execute("UPDATE counters SET n = n + 1 WHERE id = $1", i % 20 + 1)
                    assert await conn.fetchval("SELECT $1::int", i) == i
            return 15
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    done = await asyncio.gather(*(client(i) for i in range(200)))
    stop.set()
    await watcher
    assert sum(done) == 3000
    total = int(await asyncio.to_thread(pg.sql, "SELECT sum(n) FROM counters", fresh_db))
    assert total == 3000
    assert 0 < peak <= 10
    pool = pooler.pools[("app", "postgres")]
    assert pool.stats.xact_count >= 3000
    assert pool.server_count <= 10


async def test_pgbench_simple_and_extended(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(default_pool_size=4, auth_type="trust")
    base = ["pgbench", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "postgres"]
    code, _, err = await run_cmd(*base, "-i", "-q", "-s", "1", "app")
    assert code == 0, err
    for mode in ("simple", "extended"):
        code, out, err = await run_cmd(*base, "-c", "16", "-j", "2", "-t", "200", "-M", mode, "app")
        assert code == 0, err
        assert "number of transactions actually processed: 3200/3200" in out
        assert "number of failed transactions: 0" in out
    assert pooler.pools[("app", "postgres")].server_count <= 4
