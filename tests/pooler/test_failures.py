"""Failure without lying or leaking: dead backends, vanishing clients, a database that goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until

from .conftest import StartPooler

# What a driver may raise when its connection dies under it (asyncpg reports an
# unsolicited FATAL as an internal error of its state machine).
CONNECTION_DIED = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError)


async def connect(port: int, database: str = "app") -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database=database, statement_cache_size=0
    )


async def test_backend_killed_mid_transaction(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    victim = await connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    tx = victim.transaction()
    await tx.start()
    pid = await victim.fetchval("SELECT pg_backend_pid()")
    await asyncio.to_thread(pg.sql, f"SELECT pg_terminate_backend({pid})")
    with pytest.raises(CONNECTION_DIED):
        await victim.fetchval("SELECT 1")
    await wait_until(lambda: victim.is_closed() or pool.server_count == 0)
    # The dead server never went back to the pool; a new client gets a new, working one.
    other = await connect(pooler.port)
    try:
        assert await other.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await other.close()
        victim.terminate()


async def test_client_gone_mid_transaction_is_rolled_back(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    await asyncio.to_thread(pg.sql, "CREATE TABLE IF NOT EXISTS ledger (id int)", "app")
    await asyncio.to_thread(pg.sql, "TRUNCATE ledger", "app")
    leaver = await connect(pooler.port)
    tx = leaver.transaction()
    await tx.start()
    await leaver.execute("INSERT INTO ledger VALUES (1)")
    await leaver.execute("LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
    pid = await leaver.fetchval("SELECT pg_backend_pid()")
    leaver.terminate()  # the socket just closes, no COMMIT, no Terminate message
    nextone = await connect(pooler.port)
    try:
        # Same server (pool of one), clean: rolled back, no lock, no open transaction.
        assert await nextone.fetchval("SELECT pg_backend_pid()") == pid
        assert await nextone.fetchval("SELECT count(*) FROM ledger") == 0
        assert await nextone.fetchval("SELECT txid_current_if_assigned() IS NULL")
    finally:
        await nextone.close()


async def test_client_gone_mid_query_closes_that_server(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    leaver = await connect(pooler.port)
    pid = await leaver.fetchval("SELECT pg_backend_pid()")
    pool = pooler.pools[("app", "postgres")]
    query = asyncio.create_task(leaver.execute("SELECT pg_sleep(30)"))
    await wait_until(lambda: any(s.outstanding for s in pool.active))
    leaver.terminate()
    query.cancel()
    nextone = await connect(pooler.port)
    try:
        # A server with a query in flight is never handed on: the next client gets another.
        assert await nextone.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await nextone.close()


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL this test may stop and start (the session's is shared)."""
    with TempPostgres(max_connections=20) as server:
        yield server


async def test_database_down_makes_clients_wait_then_recovers(
    own_pg: TempPostgres, start_pooler: StartPooler, tmp_path: Path
) -> None:
    pooler = await start_pooler(
        auth_type="trust",
        server_login_retry=0.3,
        query_wait_timeout=1,
        databases={"flaky": {"host": own_pg.host, "port": own_pg.port, "dbname": "postgres"}},
    )
    conn = await connect(pooler.port, "flaky")
    assert await conn.fetchval("SELECT 1") == 1
    await asyncio.to_thread(own_pg.stop, "fast")
    # The client's server died with the database: it hears so, at once.
    with pytest.raises(CONNECTION_DIED):
        await conn.fetchval("SELECT 1")
    started = time.monotonic()
    with pytest.raises((asyncpg.PostgresError, OSError)) as info:
        # Login may succeed on the parameters the pool remembers; the first query waits
        # for the database (it may be restarting) and gives up at query_wait_timeout.
        fresh = await connect(pooler.port, "flaky")
        try:
            await fresh.fetchval("SELECT 1")
        finally:
            fresh.terminate()
    assert 0.9 < time.monotonic() - started < 10
    assert "query_wait_timeout" in str(info.value)
    await asyncio.to_thread(own_pg.restart_server)
    deadline = time.monotonic() + 10
    while True:
        again = None
        try:
            again = await connect(pooler.port, "flaky")
            assert await again.fetchval("SELECT 7") == 7
            break
        except (*CONNECTION_DIED, OSError):
            assert time.monotonic() < deadline, "pooler did not reconnect after the database came back"
            await asyncio.sleep(0.1)
        finally:
            if again is not None:
                again.terminate()
    conn.terminate()


async def test_query_wait_timeout_ends_the_wait_with_a_clear_error(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, query_wait_timeout=0.3)
    holder = await connect(pooler.port)
    waiter = await connect(pooler.port)
    tx = holder.transaction()
    await tx.start()
    with pytest.raises((asyncpg.ProtocolViolationError, asyncpg.ConnectionDoesNotExistError)) as info:
        await waiter.fetchval("SELECT 1")
    assert "query_wait_timeout" in str(info.value) or waiter.is_closed()
    await tx.rollback()
    assert await holder.fetchval("SELECT 1") == 1
    await holder.close()
    waiter.terminate()


async def test_idle_transaction_timeout(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, idle_transaction_timeout=0.3)
    idler = await connect(pooler.port)
    tx = idler.transaction()
    await tx.start()
    await wait_until(idler.is_closed, timeout=5)
    # Its server was rolled back or closed; the pool serves others.
    other = await connect(pooler.port)
    assert await other.fetchval("SELECT 1") == 1
    await other.close()


async def test_client_idle_timeout(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", client_idle_timeout=0.3)
    idler = await connect(pooler.port)
    await wait_until(idler.is_closed, timeout=5)
