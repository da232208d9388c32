"""Hostile and unlucky input: no client can stall, pin or probe the pooler.

Each test sends what a careless or malicious client might, then checks that the client
gets a clear error and that everyone else is still served by a pool that leaks nothing.
"""

from __future__ import annotations

import struct

import asyncpg
import pytest
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.pool import Pool
from pgfleet.pooler.protocol import backend, extended, frontend
from pgfleet.pooler.protocol.framing import frame
from pgfleet.pooler.server import ServerState

from .conftest import StartPooler
from .rawpg import RawClient, error


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
