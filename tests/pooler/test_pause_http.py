"""PUT /pause: the whole pooler's PAUSE and RESUME through the control port, for switchovers.

PAUSE lets transactions in flight finish, holds new ones in the queue and closes the
server connections; RESUME lets the queue go on against whatever server is there now. A
PostgreSQL restart between the two costs the clients nothing but the wait.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from pgfleet.devtools.tempdb import TempPostgres, free_port
from pgfleet.devtools.testing import run_cmd

from .conftest import PoolerProcess

TOKEN = "pause-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL this test may restart (the session's is shared)."""
    with TempPostgres(max_connections=30) as server:
        yield server


def start(
    pooler_process: Callable[..., PoolerProcess], tmp_path: Any, pg: TempPostgres, **settings: Any
) -> tuple[str, int]:
    """The pooler's HTTP base URL and its PostgreSQL port."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = pooler_process(
        auth_type="trust",
        http_listen_addr="127.0.0.1",
        http_listen_port=port,
        http_token_file=str(token_file),
        databases={"app": {"host": pg.host, "port": pg.port, "dbname": "postgres"}},
        **settings,
    )
    return f"http://127.0.0.1:{port}", proc.port


async def put_pause(http: aiohttp.ClientSession, base: str, paused: bool) -> dict[str, Any]:
    async with http.put(f"{base}/pause", json={"paused": paused}, headers=AUTH) as response:
        body = await response.json()
        assert response.status == 200, body
        return dict(body)


async def status(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/status") as response:
        return dict(await response.json())


async def until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"{what}: not met within {timeout} s (last: {value!r})")
        await asyncio.sleep(0.05)


async def test_pause_waits_for_transactions_and_holds_new_ones(
    pg: TempPostgres, pooler_process: Callable[..., PoolerProcess], tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    base, port = start(pooler_process, tmp_path, pg)
    async with http.put(f"{base}/pause", json={"paused": True}) as response:
        assert response.status == 401  # a write like PUT /limits: the token is needed
    async with http.put(f"{base}/pause", json={"paused": "yes"}, headers=AUTH) as response:
        assert response.status == 400 and "paused" in (await response.json())["error"]

    in_tx = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="app")
    other = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="app")
    try:
        tx = in_tx.transaction()
        await tx.start()
        backend = await in_tx.fetchval("SELECT pg_backend_pid()")
        reply = await put_pause(http, base, True)
        assert reply["paused"] is True and reply["servers"] >= 1  # the transaction keeps its server
        assert (await put_pause(http, base, True))["paused"] is True  # idempotent
        held = asyncio.ensure_future(other.fetchval("SELECT 42"))
        await until(lambda: _waiting(http, base), "the new transaction to queue behind the pause", timeout=10)
        assert not held.done()
        # The transaction in flight goes on, on its own server.
        assert await in_tx.fetchval("SELECT pg_backend_pid()") == backend
        await tx.commit()
        await until(lambda: _servers(http, base, 0), "every server closed once the transaction ended")
        assert (await status(http, base))["paused"] is True
        assert not held.done()
        reply = await put_pause(http, base, False)
        assert reply["paused"] is False
        assert await asyncio.wait_for(held, 10) == 42
        assert (await put_pause(http, base, False))["paused"] is False  # idempotent
    finally:
        await in_tx.close()
        await other.close()


async def _waiting(http: aiohttp.ClientSession, base: str) -> bool:
    return bool((await status(http, base))["totals"]["clients_waiting"] >= 1)


async def _servers(http: aiohttp.ClientSession, base: str, count: int) -> bool:
    return bool((await status(http, base))["servers"] == count)


async def test_restart_postgres_under_pgbench_while_paused(
    own_pg: TempPostgres, pooler_process: Callable[..., PoolerProcess], tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    """The switchover drill, on a pooler of two workers: zero failed transactions."""
    base, port = start(pooler_process, tmp_path, own_pg, workers=2, default_pool_size=6, query_wait_timeout=60)
    code, _, err = await run_cmd(
        "pgbench", "-h", own_pg.host, "-p", str(own_pg.port), "-U", "postgres", "-i", "-q", "postgres"
    )
    assert code == 0, err
    bench = asyncio.ensure_future(
        run_cmd(
            "pgbench",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            "4",
            "app",
            timeout=90,
        )
    )

    async def xacts() -> int:
        pools = (await status(http, base))["pools"]
        return sum(p["totals"]["xact_count"] for p in pools if p["database"] == "app")

    await until(lambda: _at_least(xacts, 200), "pgbench under way")
    reply = await put_pause(http, base, True)
    assert reply["paused"] is True and len(reply["workers"]) == 2
    await until(lambda: _servers(http, base, 0), "every worker's servers closed")
    paused_at = await xacts()
    await until(lambda: _waiting(http, base), "pgbench's clients queued")

    await asyncio.to_thread(own_pg.stop, "fast")
    await asyncio.to_thread(own_pg.restart_server)
    assert await xacts() == paused_at  # nothing ran while paused

    reply = await put_pause(http, base, False)
    assert reply["paused"] is False
    code, out, err = await bench
    print(out)  # the drill's figures, for -s runs
    assert code == 0, out + err
    assert "number of failed transactions: 0" in out, out
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert await xacts() > paused_at  # traffic went on after RESUME, on the restarted server
    assert processed > 0


async def _at_least(read: Callable[[], Any], count: int) -> bool:
    return bool(await read() >= count)


@pytest.mark.parametrize("workers", [1, 2])
async def test_start_paused_holds_the_first_clients_until_resume(
    pg: TempPostgres,
    pooler_process: Callable[..., PoolerProcess],
    tmp_path: Any,
    http: aiohttp.ClientSession,
    workers: int,
) -> None:
    """start_paused: a pooler (a pod created during a pause) serves nobody until RESUME, not even
    its first client, and opens no server meanwhile; with workers, every worker."""
    base, port = start(pooler_process, tmp_path, pg, workers=workers, start_paused=True)
    state = await status(http, base)
    assert state["paused"] is True and state["servers"] == 0
    clients = 6  # with two workers the kernel spreads them: both are tried

    async def one(i: int) -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="app", timeout=60)
        try:
            return int(await conn.fetchval("SELECT $1::int", i))
        finally:
            await conn.close()

    held = [asyncio.ensure_future(one(i)) for i in range(clients)]
    try:

        async def all_arrived() -> bool:
            return bool((await status(http, base))["clients"] == clients)

        await until(all_arrived, "every client connected to the paused pooler", timeout=20)
        state = await status(http, base)
        # Held at login (the pool has not met its server yet) or in the queue; nothing served.
        assert state["servers"] == 0 and state["paused"] is True
        assert not any(task.done() for task in held)
        # The control port's RESUME lifts a pause the pooler started with.
        reply = await put_pause(http, base, False)
        assert reply["paused"] is False
        assert sorted(await asyncio.wait_for(asyncio.gather(*held), 20)) == list(range(clients))
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
