"""SIGTERM drains (nothing in flight is lost); SIGINT stops at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import asyncpg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until


async def connect(port: int) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="app", statement_cache_size=0)


async def test_sigterm_lets_transactions_finish_then_closes_clients(pg: TempPostgres, pooler_process: object) -> None:
    proc = pooler_process(auth_type="trust", default_pool_size=5, shutdown_timeout=20)  # type: ignore[operator]
    await asyncio.to_thread(pg.sql, "CREATE TABLE IF NOT EXISTS drained (id int)", "app")
    await asyncio.to_thread(pg.sql, "TRUNCATE drained", "app")
    busy = [await connect(proc.port) for _ in range(3)]
    idle = await connect(proc.port)
    txs = [c.transaction() for c in busy]
    for i, (conn, tx) in enumerate(zip(busy, txs, strict=True)):
        await tx.start()
        await conn.execute("INSERT INTO drained VALUES ($1)", i)

    proc.signal(signal.SIGTERM)
    # The idle client is closed at once; nobody new gets in.
    await wait_until(idle.is_closed, timeout=5)
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await connect(proc.port)
    # Clients inside a transaction finish it: nothing in flight is lost.
    for i, (conn, tx) in enumerate(zip(busy, txs, strict=True)):
        await conn.execute("INSERT INTO drained VALUES ($1)", i + 10)
        await tx.commit()
    # ... and are closed at that boundary, so they reconnect elsewhere.
    for conn in busy:
        await wait_until(conn.is_closed, timeout=5)
    assert await asyncio.to_thread(proc.proc.wait, 10) == 0
    assert await asyncio.to_thread(pg.sql, "SELECT count(*) FROM drained", "app") == "6"


async def test_shutdown_timeout_bounds_the_drain(pooler_process: object) -> None:
    proc = pooler_process(auth_type="trust", shutdown_timeout=0.5)  # type: ignore[operator]
    conn = await connect(proc.port)
    tx = conn.transaction()
    await tx.start()  # never finished
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 10) == 0
    conn.terminate()


async def test_sigint_exits_promptly(pooler_process: object) -> None:
    proc = pooler_process(auth_type="trust", shutdown_timeout=60)  # type: ignore[operator]
    conn = await connect(proc.port)
    tx = conn.transaction()
    await tx.start()
    proc.signal(signal.SIGINT)
    try:
        assert await asyncio.to_thread(proc.proc.wait, 5) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("SIGINT did not stop the pooler promptly")
    conn.terminate()
