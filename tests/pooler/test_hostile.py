"""Hostile and unlucky input: no client can stall, pin or probe the pooler.

Each test sends what a careless or malicious client might, then checks that the client
gets a clear error and that everyone else is still served by a pool that leaks nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.auth import md5_response, md5_secret
from pgfleet.pooler.config import parse_config
from pgfleet.pooler.pool import Pool
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import backend, extended, frontend
from pgfleet.pooler.protocol.framing import frame
from pgfleet.pooler.protocol.startup import StartupMessage, build_startup_message, parse_startup_packet
from pgfleet.pooler.server import ServerState
from pgfleet.pooler.userlist import dump_userlist
from scramp import ScramClient

from .conftest import PoolerProcess, StartPooler, pooler_settings
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
    # PostgreSQL would answer with an error and then ignore everything up to a Sync, a
    # state the proxy cannot see from a Flush that asks for no reply.
    "Flush with a body": frame(b"H", b"\x00"),
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


@pytest.mark.parametrize("in_transaction", [False, True], ids=["between transactions", "inside a transaction"])
async def test_a_client_leaving_after_a_flush_with_a_body_leaves_no_server_deaf(
    start_pooler: StartPooler, in_transaction: bool
) -> None:
    # Found by test_fuzz_pooler_after_login: the server, ignoring all until a Sync, went
    # back to the pool as clean, and the next client's query got no answer.
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    client = await RawClient.connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    if in_transaction:
        client.send(frontend.query("BEGIN"))
        await client.until_ready()
    client.send(frame(b"H", b"\x00"))
    await client.close()
    await still_serves(pooler.port, pool)


async def test_a_flush_whose_body_comes_later_is_framed_whole(start_pooler: StartPooler) -> None:
    # Its five bytes of head alone were once taken for a lone Flush and dropped, and the
    # body that followed read as the next message.
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    client = await RawClient.connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    message = frame(b"H", b"\x00\x00\x00\x00")
    client.send(message[:5])
    await wait_until(lambda: bool(pool.active))  # the head alone asks for a server
    client.send(message[5:])
    fields = await closed_with_error(client)
    assert (fields["C"], fields["M"]) == ("08P01", "invalid message format")
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


def _long_exchange(port: int, size: int, direction: str, reply: list[bytes]) -> None:
    """A blocking client (its own thread) that keeps its socket full with a long Query or reads a long result."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:

        def until_ready() -> bytes:
            got = bytearray()
            while not got.endswith(backend.ready_for_query()):
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("closed")
                got += data
            return bytes(got)

        sock.sendall(build_startup_message({"user": "postgres", "database": "app"}))
        until_ready()
        if direction == "long Query":
            sql = b"SELECT length('" + b"x" * size + b"')\x00"
        else:
            sql = b"SELECT length(repeat('z', %d)), repeat('z', %d)\x00" % (size, size)
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(sql)) + sql)
        reply.append(until_ready())


@pytest.mark.parametrize("direction", ["long Query", "long result"])
@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_long_message_is_read_one_buffer_per_turn_of_the_loop(
    pg: TempPostgres, tmp_path: Path, loop_name: str, direction: str
) -> None:
    # uvloop reads a socket up to 32 times in a turn while it stays full: 8 MB of copying
    # during which no other client is looked at. A client sending a long message, and a
    # server sending a long result, yield the loop after each read.
    size = 32 << 20
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pooler = Pooler(parse_config(pooler_settings(pg, tmp_path, auth_type="trust", default_pool_size=2)))
        await pooler.start()
        try:
            reply: list[bytes] = []
            sender = threading.Thread(target=_long_exchange, args=(pooler.port, size, direction, reply))
            sender.start()
            await wait_until(lambda: ("app", "postgres") in pooler.pools)
            stats = pooler.pools[("app", "postgres")].stats

            def moved() -> int:  # bytes the pooler read from the client, or sent to it
                return stats.bytes_received if direction == "long Query" else stats.bytes_sent

            per_turn: list[int] = []
            done = loop.create_future()
            last = moved()

            def turn() -> None:  # runs once in each turn of the loop
                nonlocal last
                per_turn.append(moved() - last)
                last = moved()
                if sender.is_alive():
                    loop.call_soon(turn)
                else:
                    done.set_result(None)

            loop.call_soon(turn)
            await asyncio.wait_for(done, 120)
            sender.join()
            assert reply and b"D" in reply[0] and b"\x00\x00\x00\x08%d" % size in reply[0]
            return per_turn
        finally:
            await pooler.stop()

    per_turn = uvloop.run(main()) if loop_name == "uvloop" else asyncio.run(main())
    assert sum(per_turn) > size
    assert max(per_turn) <= 512 << 10, f"{max(per_turn) >> 10} KiB through one connection in one turn of the loop"


# -- a DEALLOCATE the proxy cannot see -----------------------------------------------------------


async def test_hidden_deallocate_is_prepared_again_in_place(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        query = "SELECT $1::int + 1"
        assert await conn.fetchval(query, 1) == 2
        # Inside a DO block the scanner sees no DEALLOCATE: the proxy still believes the
        # server holds the statement. asyncpg's Bind/Execute/Sync gets 26000 first in its
        # exchange, before anything reached the client: prepared again and sent again.
        await conn.execute("do $$ begin execute 'deallocate all'; end $$")
        for value in range(2, 5):
            assert await conn.fetchval(query, value) == value + 1
    finally:
        await conn.close()
    # Every later client of the pool is served on that same server.
    other = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        assert await other.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await other.close()


async def test_hidden_deallocate_is_prepared_again_in_place_for_psycopg(start_pooler: StartPooler) -> None:
    # psycopg's prepared execution: Bind, Describe portal, Execute, Sync.
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", prepare_threshold=0, autocommit=True
    ) as conn:
        query = "SELECT %s::int * 2"
        assert await (await conn.execute(query, (1,))).fetchone() == (2,)
        await conn.execute("do $$ begin execute 'deallocate all'; end $$")
        for value in range(2, 5):
            assert await (await conn.execute(query, (value,))).fetchone() == (value * 2,)
    assert pooler.pools[("app", "postgres")].stats.errors >= 1  # the server did refuse once


async def test_hidden_deallocate_inside_a_transaction_fails_once_then_heals(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        query = "SELECT $1::int + 1"
        assert await conn.fetchval(query, 1) == 2
        await conn.execute("do $$ begin execute 'deallocate all'; end $$")
        # In a transaction block the error has aborted it: sending again cannot help.
        transaction = conn.transaction()
        await transaction.start()
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await conn.fetchval(query, 2)
        await transaction.rollback()
        assert await conn.fetchval(query, 3) == 4
    finally:
        await conn.close()


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
    with pytest.raises(
        asyncpg.ProtocolViolationError, match=r"no more connections allowed \(max_client_conn\)"
    ) as info:
        await connect(pooler.port)
    assert (info.value.sqlstate, info.value.severity) == ("08P01", "FATAL")  # PgBouncer's code
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
            assert backend.parse_error_fields(data[5 : 1 + int.from_bytes(data[1:5])])["C"] == "08P01"
        await wait_until(lambda: len(pooler.clients) == kept)
    finally:
        for _, writer in flood:
            writer.close()
            await writer.wait_closed()


async def test_accept_out_of_file_descriptors_is_logged_and_serving_resumes(
    pooler_process: Callable[..., PoolerProcess],
) -> None:
    proc = pooler_process(auth_type="trust", max_client_conn=1000)
    # A small descriptor table, soft and hard alike, set from outside (as a container's would be).
    resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    # Silent sockets until the pooler has no descriptor left: accept() fails (the event
    # loop drops or defers the connection), and the log must say why.
    silent = [await asyncio.open_connection("127.0.0.1", proc.port) for _ in range(100)]
    try:
        await wait_until(lambda: "out of file descriptors" in proc.log(), timeout=20)
        assert "limit 64" in proc.log()
    finally:
        for _, writer in silent:
            writer.close()

    # Once they leave, the pooler still listens and serves.
    async def served() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=proc.port, user="postgres", database="app")
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            assert await asyncio.wait_for(served(), 10) == 1
            break
        except (OSError, asyncpg.PostgresError, TimeoutError):
            # Descriptors are freed as the pooler sees the sockets close.
            assert asyncio.get_running_loop().time() < deadline, proc.log()
            await asyncio.sleep(0.2)


async def raw_login(port: int, user: str, database: str = "app") -> tuple[RawClient, backend.AuthRequest]:
    """A startup packet sent by hand; the authentication request it gets."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    writer.write(build_startup_message({"user": user, "database": database}))
    kind, body = await client.message()
    assert kind == "R", (kind, body)
    return client, backend.parse_authentication(body)


async def answers_until_ready_or_error(client: RawClient) -> list[tuple[str, bytes]]:
    """The pooler's messages up to ReadyForQuery or an error; the client is closed after."""
    out: list[tuple[str, bytes]] = []
    try:
        while not out or out[-1][0] not in "ZE":
            out.append(await client.message())
    finally:
        await client.close()
    return out


async def answer(client: RawClient, request: backend.AuthRequest, user: str, password: str) -> list[tuple[str, bytes]]:
    """Answer an authentication request with `password`; the messages up to the end of the login."""
    if request.code == backend.AUTH_MD5:
        client.send(frontend.password_message(md5_response(user, password, request.data[:4])))
    elif request.code == backend.AUTH_CLEARTEXT:
        client.send(frontend.password_message(password))
    else:
        assert request.code == backend.AUTH_SASL
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        client.send(frontend.sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode()))
        _, body = await client.message()
        server_first = backend.parse_authentication(body).data.decode()
        scram.set_server_first(server_first)
        client.send(frontend.sasl_response(scram.get_client_final().encode()))
    return await answers_until_ready_or_error(client)


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
async def test_unknown_user_or_database_is_challenged_like_anyone(start_pooler: StartPooler, auth_type: str) -> None:
    pooler = await start_pooler(auth_type=auth_type)
    user = {"md5": "md5user", "scram-sha-256": "scramuser", "plain": "plainuser"}[auth_type]
    requests = {}
    for name, (who, database) in {
        "known": (user, "app"),
        "unknown user": ("nobody", "app"),
        "unknown database": (user, "nope"),
    }.items():
        client, request = await raw_login(pooler.port, who, database)
        requests[name] = request.code
        # A wrong password: the same refusal whatever was unknown, and only at the end.
        fields = error(await answer(client, request, who, "wrong"))
        assert (fields["C"], fields["M"]) == ("28P01", f'password authentication failed for user "{who}"')
    assert len(set(requests.values())) == 1, requests
    if auth_type == "scram-sha-256":

        async def server_first(who: str) -> dict[str, str]:
            client, _ = await raw_login(pooler.port, who)
            scram = ScramClient(["SCRAM-SHA-256"], who, "x")
            client.send(frontend.sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode()))
            _, body = await client.message()
            await client.close()
            return dict(p.split("=", 1) for p in body[4:].decode().split(","))

        # The mock salt of a user name is the same each time, as a real one would be.
        mock = [await server_first("nobody") for _ in range(2)]
        assert mock[0]["s"] == mock[1]["s"]
        # And it looks like a real one: as long, with the same iteration count.
        real = await server_first(user)
        assert (len(base64.b64decode(mock[0]["s"])), mock[0]["i"]) == (len(base64.b64decode(real["s"])), real["i"])


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
async def test_empty_password_never_logs_in(start_pooler: StartPooler, auth_type: str) -> None:
    # The test userlist gives postgres an empty password (a templating slip alike).
    pooler = await start_pooler(auth_type=auth_type)
    client, request = await raw_login(pooler.port, "postgres")
    assert error(await answer(client, request, "postgres", ""))["C"] == "28P01"


async def send_in_pieces(client: RawClient, data: bytes, size: int = 3) -> None:
    for start in range(0, len(data), size):
        client.send(data[start : start + size])
        await client.writer.drain()
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("auth_type", "user", "password"),
    [("md5", "md5user", "md5pass"), ("scram-sha-256", "scramuser", "scrampass"), ("plain", "plainuser", "plainpass")],
)
async def test_password_login_in_pieces_is_greeted_once_whole(
    start_pooler: StartPooler, auth_type: str, user: str, password: str
) -> None:
    """Each answer arriving a few bytes at a time logs in; the last answer gets the greeting
    in one go: SASLFinal (SCRAM), AuthenticationOk, ParameterStatus..., BackendKeyData,
    ReadyForQuery; and the client's queries then run."""
    pooler = await start_pooler(auth_type=auth_type)
    client, request = await raw_login(pooler.port, user)
    try:
        if request.code == backend.AUTH_SASL:
            scram = ScramClient(["SCRAM-SHA-256"], user, password)
            first = frontend.sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode())
            await send_in_pieces(client, first)
            kind, body = await client.message()
            continued = backend.parse_authentication(body)
            assert (kind, continued.code) == ("R", backend.AUTH_SASL_CONTINUE)
            scram.set_server_first(continued.data.decode())
            await send_in_pieces(client, frontend.sasl_response(scram.get_client_final().encode()))
            kind, body = await client.message()
            final = backend.parse_authentication(body)
            assert (kind, final.code) == ("R", backend.AUTH_SASL_FINAL)
            scram.set_server_final(final.data.decode())  # the pooler proved it knows the verifier
        elif request.code == backend.AUTH_MD5:
            await send_in_pieces(client, frontend.password_message(md5_response(user, password, request.data[:4])))
        else:
            await send_in_pieces(client, frontend.password_message(password))
        greeting = await client.until_ready()
        kinds = [kind for kind, _ in greeting]
        assert kinds[0] == "R" and backend.parse_authentication(greeting[0][1]).code == backend.AUTH_OK
        assert set(kinds[1:-2]) == {"S"} and kinds[-2:] == ["K", "Z"]
        client.send(frontend.query("SELECT current_user"))
        assert rows(await client.until_ready()) == [[user]]
    finally:
        await client.close()


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
async def test_what_is_not_a_password_answer_ends_the_login_with_08P01(
    start_pooler: StartPooler, auth_type: str
) -> None:
    """A message other than the password answer, or more than one at once, or SASL naming
    another mechanism: a protocol violation for that client only."""
    pooler = await start_pooler(auth_type=auth_type)
    user = {"md5": "md5user", "scram-sha-256": "scramuser", "plain": "plainuser"}[auth_type]
    answers = {
        "a query instead": frontend.query("SELECT 1"),
        "an answer and a query": frontend.password_message("x") + frontend.query("SELECT 1"),
    }
    if auth_type == "scram-sha-256":
        answers["another mechanism"] = frontend.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=,r=abc")
    for what, data in answers.items():
        client, _ = await raw_login(pooler.port, user)
        client.send(data)
        assert error(await answers_until_ready_or_error(client))["C"] == "08P01", what
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app"
    )
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_non_ascii_passwords(pg: TempPostgres, start_pooler: StartPooler, tmp_path: Path) -> None:
    auth_file = tmp_path / "unicode-userlist.txt"
    auth_file.write_text(dump_userlist({"unicode": "pässwörd", "md5unicode": md5_secret("md5unicode", "pässwörd")}))
    # Server logins as postgres (trust), whoever the client is.
    app = {"app": {"host": pg.host, "port": pg.port, "user": "postgres"}}
    for auth_type, user in (("plain", "unicode"), ("md5", "unicode"), ("md5", "md5unicode")):
        pooler = await start_pooler(auth_type=auth_type, auth_file=str(auth_file), databases=app)
        conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user=user, password="pässwörd", database="app")
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        for wrong in ("pässwort", "päss"):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(host="127.0.0.1", port=pooler.port, user=user, password=wrong, database="app")
    # An md5 answer that is not even ASCII: refused as wrong, not an internal error.
    pooler = await start_pooler(auth_type="md5", auth_file=str(auth_file), databases=app)
    client, _ = await raw_login(pooler.port, "unicode")
    client.send(frontend.password_message("md5ü" + "0" * 31))
    messages = [await client.message()]
    await client.close()
    assert error(messages)["C"] == "28P01"


def test_reload_with_a_missing_or_malformed_userlist_is_logged(pooler_process: Callable[..., PoolerProcess]) -> None:
    pooler = pooler_process(auth_type="md5")
    auth_file = Path(pooler.settings["auth_file"])

    def logged(text: str) -> None:
        deadline = time.monotonic() + 15
        while text not in pooler.log():
            assert time.monotonic() < deadline, pooler.log()
            time.sleep(0.05)

    auth_file.unlink()
    pooler.signal(signal.SIGHUP)
    logged("cannot read auth_file")
    auth_file.write_text('"md5user" md5pass\n')
    pooler.signal(signal.SIGHUP)
    logged("expected a double-quoted value")
    assert pooler.log().count("reload failed, keeping the running config") == 2
    # The running userlist stayed.
    dsn = f"host=127.0.0.1 port={pooler.port} user=md5user password=md5pass dbname=app"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_startup_asking_for_3_2_and_protocol_options_is_parsed_for_negotiation() -> None:
    body = (3 << 16 | 2).to_bytes(4, "big") + b"user\x00u\x00_pq_.opt\x00x\x00\x00"
    packet = parse_startup_packet(body)
    assert isinstance(packet, StartupMessage)
    assert (packet.minor_version, packet.protocol_options, packet.params) == (2, ("_pq_.opt",), {"user": "u"})
    assert backend.negotiate_protocol_version(0, ["_pq_.opt"]) == frame(
        b"v", struct.pack("!ii", 3 << 16, 1) + b"_pq_.opt\x00"
    )


@pytest.mark.parametrize(
    ("minor", "options"), [(2, {}), (0, {"_pq_.unknown": "on"}), (2, {"_pq_.a": "1", "_pq_.b": "2"})]
)
async def test_newer_protocol_and_protocol_options_are_negotiated_down(
    start_pooler: StartPooler, minor: int, options: dict[str, str]
) -> None:
    pooler = await start_pooler(auth_type="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    client = RawClient(reader, writer)
    body = (3 << 16 | minor).to_bytes(4, "big")
    body += b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in {"user": "postgres", **options}.items())
    body += b"\x00"
    writer.write((len(body) + 4).to_bytes(4, "big") + body)
    kind, data = await client.message()
    # As PostgreSQL: NegotiateProtocolVersion (3.0 and the options not taken), then login.
    assert kind == "v"
    version, count = struct.unpack("!ii", data[:8])
    assert (version, count) == (3 << 16, len(options))
    assert data[8:].split(b"\x00")[:-1] == [name.encode() for name in options]
    await client.until_ready()
    client.send(frontend.query("SELECT 1"))
    assert rows(await client.until_ready()) == [["1"]]
    await client.close()


# -- the control surface ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "bound"),
    [
        ("default_pool_size", "9223372036854775808", "2147483647"),
        ("max_client_conn", "1e30", "integer"),
        ("query_timeout", "1e30", "not a duration"),
        ("server_lifetime", "99999999999", "315360000"),
    ],
)
async def test_console_set_refuses_out_of_range_values_naming_the_bound(
    start_pooler: StartPooler, setting: str, value: str, bound: str
) -> None:
    pooler = await start_pooler(auth_type="trust", admin_users=["postgres"])
    before = pooler.config
    admin = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database="pgbouncer", statement_cache_size=0
    )
    try:
        with pytest.raises(asyncpg.PostgresError, match=bound):
            await admin.execute(f"SET {setting} = {value}")
        assert pooler.config is before
        await admin.execute(f"SET {setting} = 7")  # an in-range value still goes through
        assert getattr(pooler.config, setting) == 7
    finally:
        await admin.close()
