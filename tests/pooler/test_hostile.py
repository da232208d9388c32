"""Hostile and unlucky input: no client can stall, pin or probe the pooler.

Each test sends what a careless or malicious client might, then checks that the client
gets a clear error and that everyone else is still served by a pool that leaks nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.pool import Pool
from pgfleet.pooler.protocol import backend, extended, frontend
from pgfleet.pooler.protocol.framing import frame
from pgfleet.pooler.server import ServerState

from .conftest import PoolerProcess, StartPooler
from .rawpg import RawClient, error, rows


async def connect(port: int) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="app", statement_cache_size=0)


async def closed_with_error(client: RawClient) -> dict[str, str]:
    """The ErrorResponse a client got before its connection closed."""
    messages: list[tuple[str, bytes]] = []
    try:
        while True:
            messages.append(await client.message())
    except ConnectionError:
        pass
    await client.close()
    return error(messages)


async def still_serves(port: int, pool: Pool) -> None:
    """Another client gets its query answered, and the pool ends up with no server lost."""
    other = await connect(port)
    try:
        assert await other.fetchval("SELECT 42") == 42
    finally:
        await other.close()
    await wait_until(lambda: not pool.active and pool.connecting == 0)
    assert all(server.state is ServerState.IDLE and server.is_clean for server in pool.idle)
    assert pool.server_count <= pool.pool_size


# Messages the proxy must read (statement names) but that do not hold together.
MALFORMED = {
    "empty Describe": frame(b"D"),
    "empty Close": frame(b"C"),
    "Close name unterminated": frame(b"C", b"Sname"),
    "Describe name unterminated": frame(b"D", b"Sname"),
    "empty Parse": frame(b"P"),
    "Parse query unterminated": frame(b"P", b"stmt\x00select 1"),
    "Parse name not UTF-8": frame(b"P", b"\xff\xfe\x00select 1\x00\x00\x00"),
    "empty Bind": frame(b"B"),
    "Bind name unterminated": frame(b"B", b"\x00stmt"),
}


@pytest.mark.parametrize("message", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("idle_server", [True, False], ids=["idle server", "server opened for it"])
async def test_malformed_message_gets_08P01_and_frees_its_server(
    start_pooler: StartPooler, message: bytes, idle_server: bool
) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    client = await RawClient.connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    if not idle_server:
        # The message then reaches the server from the task that opens one (Pool._open).
        pool.close_all("test")
        await wait_until(lambda: pool.server_count == 0)
    client.send(message, frontend.SYNC)
    fields = await closed_with_error(client)
    assert (fields["C"], fields["M"]) == ("08P01", "invalid message format")
    await still_serves(pooler.port, pool)


async def test_ten_malformed_parses_do_not_take_the_pool(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    clients = [await RawClient.connect(pooler.port) for _ in range(10)]
    pool = pooler.pools[("app", "postgres")]
    pool.close_all("test")
    for client in clients:
        client.send(frame(b"P", b"stmt\x00select 1"), frontend.SYNC)
    for client in clients:
        assert (await closed_with_error(client))["C"] == "08P01"
    await still_serves(pooler.port, pool)


async def test_a_good_message_before_a_bad_one_leaves_no_server_half_used(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    client = await RawClient.connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    client.send(extended.parse("s1", "select 1"), extended.describe(extended.STATEMENT, "s1"), frame(b"C"))
    assert (await closed_with_error(client))["C"] == "08P01"
    await still_serves(pooler.port, pool)


def test_frames_used_here_are_what_they_say() -> None:
    # The lying messages above are built by hand: check one against the codec's own builder.
    assert frame(b"D", b"Sx\x00") == extended.describe(extended.STATEMENT, "x")
    assert struct.unpack("!i", frame(b"C")[1:5]) == (4,)
    assert backend.error_response("08P01", "x")[0:1] == b"E"


# -- large messages: streamed through, never held whole ------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_large_query_streams_through_while_others_are_served(
    pooler_process: Callable[..., PoolerProcess],
) -> None:
    size = 48 << 20
    pooler = pooler_process(auth_type="trust", default_pool_size=2)
    other = await connect(pooler.port)
    big = await RawClient.connect(pooler.port)
    try:
        for _ in range(3):  # warm up: every pool, code path and buffer the pooler keeps
            big.send(frontend.query("SELECT 1"))
            await big.until_ready()
            assert await other.fetchval("SELECT 42") == 42
        before = peak_rss(pooler.proc.pid)
        sql = b"SELECT length('" + b"x" * size + b"')\x00"
        message = b"Q" + struct.pack("!i", 4 + len(sql)) + sql
        step = 4 << 20
        for start in range(0, len(message), step):
            big.writer.write(message[start : start + step])
            await big.writer.drain()
            # Half a query sent, or most of it: everyone else is still served meanwhile.
            assert await asyncio.wait_for(other.fetchval("SELECT 42"), 30) == 42
        assert rows(await big.until_ready()) == [[str(size)]]
        grown = peak_rss(pooler.proc.pid) - before
        assert grown < size // 3, f"the pooler's peak memory grew by {grown >> 20} MiB for a {size >> 20} MiB query"
    finally:
        await big.close()
        await other.close()


@pytest.mark.parametrize("cache", [100, 0], ids=["named statement", "unnamed statement"])
async def test_large_bind_streams_through_renamed(pooler_process: Callable[..., PoolerProcess], cache: int) -> None:
    size = 24 << 20
    pooler = pooler_process(auth_type="trust", default_pool_size=2)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database="app", statement_cache_size=cache
    )
    try:
        query = "SELECT length($1::text), md5($1::text)"
        assert await conn.fetchrow(query, "warm") == (4, hashlib.md5(b"warm").hexdigest())
        before = peak_rss(pooler.proc.pid)
        value = "y" * size
        assert tuple(await conn.fetchrow(query, value)) == (size, hashlib.md5(value.encode()).hexdigest())
        grown = peak_rss(pooler.proc.pid) - before
        assert grown < size // 2, f"the pooler's peak memory grew by {grown >> 20} MiB for a {size >> 20} MiB Bind"
        # The statement is still mapped and usable after the long Bind.
        assert await conn.fetchval("SELECT length($1::text)", "again") == 5
    finally:
        await conn.close()


async def test_long_mapped_parse_is_gathered_whole(pooler_process: Callable[..., PoolerProcess]) -> None:
    pooler = pooler_process(auth_type="trust", default_pool_size=2)
    conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        literal = "z" * (3 << 20)
        # A named statement of 3 MiB of SQL: the proxy keeps it to prepare it on any server.
        for _ in range(2):
            assert await conn.fetchval(f"SELECT length('{literal}') + $1::int", 1) == len(literal) + 1
    finally:
        await conn.close()


# -- a DEALLOCATE the proxy cannot see -----------------------------------------------------------


async def test_hidden_deallocate_fails_at_most_once_then_heals(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        query = "SELECT $1::int + 1"
        assert await conn.fetchval(query, 1) == 2
        # Inside a DO block the scanner sees no DEALLOCATE: the proxy still believes the
        # server holds the statement.
        await conn.execute("do $$ begin execute 'deallocate all'; end $$")
        failures = 0
        for value in range(2, 5):
            try:
                assert await conn.fetchval(query, value) == value + 1
            except asyncpg.InvalidSQLStatementNameError:
                failures += 1
        assert failures <= 1
    finally:
        await conn.close()
    # Every later client of the pool is served on that same server.
    other = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        assert await other.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await other.close()


# -- a client that leaves mid-query ----------------------------------------------------------------


async def test_client_leaving_mid_query_cancels_it(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    leaver = await connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    marker = "hostile_leaver_marker"
    query = asyncio.create_task(leaver.execute(f"SELECT pg_sleep(60) /* {marker} */"))
    await wait_until(lambda: any(s.outstanding for s in pool.active))
    leaver.terminate()
    query.cancel()

    def running() -> int:
        sql = f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND state = 'active' AND pid <> pg_backend_pid()"
        return int(pg.sql(sql).strip())

    # PostgreSQL stops the query now rather than running it to its end on a backend the
    # pool no longer counts.
    deadline = asyncio.get_running_loop().time() + 15
    while await asyncio.to_thread(running):
        assert asyncio.get_running_loop().time() < deadline, "the query kept running after its client left"
        await asyncio.sleep(0.1)
    await still_serves(pooler.port, pool)


# -- before login --------------------------------------------------------------------------------------


async def test_clients_count_from_accept_against_max_client_conn(
    start_pooler: StartPooler, caplog: pytest.LogCaptureFixture
) -> None:
    pooler = await start_pooler(auth_type="trust", max_client_conn=3, admin_users=["postgres"])
    # Three sockets that never say a word (a client stuck at its password prompt alike).
    silent = [await asyncio.open_connection("127.0.0.1", pooler.port) for _ in range(3)]
    await wait_until(lambda: len(pooler.clients) == 3)
    with pytest.raises(asyncpg.TooManyConnectionsError, match=r"no more connections allowed \(max_client_conn\)"):
        await connect(pooler.port)
    assert "max_client_conn (3) reached" in caplog.text
    # The admin console still gets in, to see what is going on.
    admin = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database="pgbouncer", statement_cache_size=0
    )
    await admin.close()
    for _, writer in silent:
        writer.close()
        await writer.wait_closed()
    await wait_until(lambda: not pooler.clients)
    conn = await connect(pooler.port)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_a_flood_of_silent_sockets_is_turned_away_at_accept(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", max_client_conn=2)
    flood = [await asyncio.open_connection("127.0.0.1", pooler.port) for _ in range(40)]
    kept = 2 + 16  # max_client_conn and the margin kept for the admin console and cancels
    try:
        # Accepted in the order they connected: those past the margin are closed at once,
        # with the reason, so that they hold no file descriptor.
        for reader, _ in flood[kept:]:
            data = await asyncio.wait_for(reader.read(), 10)
            assert b"no more connections allowed" in data
        await wait_until(lambda: len(pooler.clients) == kept)
    finally:
        for _, writer in flood:
            writer.close()
            await writer.wait_closed()
