"""PgBouncer parity: behaviours a PgBouncer user relies on, each against a real PostgreSQL.

Each test names the PgBouncer behaviour it holds pgfleet to (docs/compatibility.md lists
them all, with the deliberate differences).
"""

from __future__ import annotations

import asyncio

from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.startup import build_cancel_request, build_startup_message

from .conftest import StartPooler
from .rawpg import RawClient, error, rows


async def raw_login(port: int, user: str = "postgres", database: str = "app") -> tuple[RawClient, tuple[int, int]]:
    """A raw client, logged in, and its cancel key (BackendKeyData)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    writer.write(build_startup_message({"user": user, "database": database}))
    messages = await client.until_ready()
    [key] = [backend.parse_backend_key_data(body) for kind, body in messages if kind == "K"]
    return client, key


async def send_cancel(port: int, key: tuple[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_cancel_request(*key))
    await reader.read()  # the pooler closes the connection once it has the request
    writer.close()


# -- 1. a cancel never lands on the next client's query -------------------------------------------


async def test_cancels_in_flight_never_reach_the_next_clients_query(start_pooler: StartPooler) -> None:
    """PgBouncer keeps a server from the next client until the cancels sent to it are done."""
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    pool_key = ("app", "postgres")
    first, key = await raw_login(pooler.port)
    second, _ = await raw_login(pooler.port)
    try:
        first.send(frontend.query("select pg_sleep(5)"))
        await wait_until(lambda: any(s.outstanding for s in pooler.pools[pool_key].active))
        second.send(frontend.query("select pg_sleep(0.5), 'second done'"))
        await wait_until(lambda: len(pooler.pools[pool_key].waiting) == 1)
        await asyncio.gather(*(send_cancel(pooler.port, key) for _ in range(100)))
        assert error(await first.until_ready())["C"] == "57014"  # query_canceled
        answer = await second.until_ready()
        assert rows(answer) == [["", "second done"]], answer
    finally:
        await first.close()
        await second.close()
