"""Server-side limits and timeouts: min_pool_size, idle timeout, lifetime, per-user cap, connect timeout."""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until

from .conftest import StartPooler, own_app


async def connect(port: int, user: str = "postgres", password: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, password=password, database="app", statement_cache_size=0
    )


async def test_min_pool_size_keeps_servers_open(pg: TempPostgres, start_pooler: StartPooler, fresh_db: str) -> None:
    pooler = await start_pooler(auth_type="trust", min_pool_size=3, databases=own_app(pg, fresh_db))
    conn = await connect(pooler.port)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        # A pool with a client is topped up to min_pool_size by the janitor, unasked.
        await wait_until(lambda: pg.client_backends(None, fresh_db) == 3, timeout=10)
    finally:
        await conn.close()


async def test_server_idle_timeout_closes_idle_servers(
    pg: TempPostgres, start_pooler: StartPooler, fresh_db: str
) -> None:
    pooler = await start_pooler(auth_type="trust", server_idle_timeout=0.3, databases=own_app(pg, fresh_db))
    conns = [await connect(pooler.port) for _ in range(3)]
    try:
        await asyncio.gather(*(c.execute("SELECT pg_sleep(0.1)") for c in conns))
        assert pooler.pools[("app", "postgres")].server_count >= 2
        await wait_until(lambda: pg.client_backends(None, fresh_db) == 0, timeout=10)
        # Clients are untouched and get a fresh server when they need one.
        assert await conns[0].fetchval("SELECT 2") == 2
    finally:
        for c in conns:
            await c.close()


async def test_server_lifetime_replaces_old_servers_between_transactions(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, server_lifetime=0.3)
    conn = await connect(pooler.port)
    try:
        tx = conn.transaction()
        await tx.start()
        first = await conn.fetchval("SELECT pg_backend_pid()")
        await asyncio.sleep(0.5)  # the server outlives its lifetime inside a transaction ...
        assert await conn.fetchval("SELECT pg_backend_pid()") == first  # ... which is never cut
        await tx.commit()
        await wait_until(lambda: pooler.pools[("app", "postgres")].server_count == 0, timeout=5)
        assert await conn.fetchval("SELECT pg_backend_pid()") != first
    finally:
        await conn.close()


async def test_max_user_connections_caps_a_user_over_databases(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="md5", default_pool_size=5, max_user_connections=2)
    conns = [
        await asyncpg.connect(
            host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", database=db, statement_cache_size=0
        )
        for db in ("app", "postgres") * 3
    ]
    try:
        await asyncio.gather(*(c.execute("SELECT pg_sleep(0.05)") for c in conns))
        assert sum(p.server_count for p in pooler.pools.values() if p.user == "md5user") <= 2
        assert await asyncio.to_thread(pg.client_backends, "md5user") <= 2
    finally:
        for c in conns:
            await c.close()


async def test_server_connect_timeout_gives_a_clear_error(start_pooler: StartPooler) -> None:
    # A port that accepts connections and never says a word, like a hung database.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        pooler = await start_pooler(
            auth_type="trust",
            server_connect_timeout=0.3,
            query_wait_timeout=1,  # a hung database may come back: the client waits this long
            databases={"hung": {"host": "127.0.0.1", "port": port, "dbname": "postgres"}},
        )
        started = time.monotonic()
        with pytest.raises((asyncpg.PostgresError, OSError)) as info:
            await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="hung")
        assert "server_connect_timeout" in str(info.value)
        assert time.monotonic() - started < 5
    finally:
        silent.close()
