"""Client authentication and login errors, with real clients and raw bytes."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import psycopg
import pytest
from pgfleet.pooler.protocol import backend
from pgfleet.pooler.protocol.startup import build_ssl_request, build_startup_message

from .conftest import StartPooler


async def connect(port: int, user: str, password: str | None, database: str = "app") -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, password=password, database=database, statement_cache_size=0
    )


@pytest.mark.parametrize(
    ("auth_type", "user", "password"),
    [
        ("md5", "md5user", "md5pass"),
        ("md5", "scramuser", "scrampass"),
        ("scram-sha-256", "scramuser", "scrampass"),
        ("plain", "plainuser", "plainpass"),
        ("trust", "postgres", None),
    ],
)
async def test_each_auth_type_logs_in_and_reaches_the_server(
    start_pooler: StartPooler, auth_type: str, user: str, password: str | None
) -> None:
    # The pooler logs in to PostgreSQL with the method pg_hba asks of that user
    # (md5user: md5, scramuser: SCRAM, plainuser: cleartext, postgres: trust).
    pooler = await start_pooler(auth_type=auth_type)
    conn = await connect(pooler.port, user, password)
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()


async def test_libpq_scram_login(start_pooler: StartPooler) -> None:
    # libpq sends an empty SCRAM user name; the pooler must take the startup user.
    pooler = await start_pooler(auth_type="scram-sha-256")
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", dbname="app"
    ) as conn:
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
async def test_wrong_password_is_28P01_and_harms_nobody(start_pooler: StartPooler, auth_type: str) -> None:
    pooler = await start_pooler(auth_type=auth_type)
    good = await connect(pooler.port, "scramuser", "scrampass")
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await connect(pooler.port, "scramuser", "wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await connect(pooler.port, "nobody", "whatever")
        assert await good.fetchval("SELECT 2") == 2
    finally:
        await good.close()


async def test_unknown_database_is_3D000(start_pooler: StartPooler) -> None:
    pooler = await start_pooler()
    with pytest.raises(asyncpg.InvalidCatalogNameError, match="no such database"):
        await connect(pooler.port, "md5user", "md5pass", database="nope")


async def test_database_missing_on_the_server_relays_its_error(start_pooler: StartPooler) -> None:
    # Nothing listens there: as for a database restarting, the login waits (query_wait_timeout),
    # then hears why.
    pooler = await start_pooler(
        query_wait_timeout=1, databases={"ghost": {"host": "127.0.0.1", "port": 1, "dbname": "ghost"}}
    )
    with pytest.raises((asyncpg.PostgresError, OSError)) as info:
        await connect(pooler.port, "md5user", "md5pass", database="ghost")
    assert "cannot connect" in str(info.value)


async def test_too_many_clients_is_fatal_08p01_as_in_pgbouncer(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(max_client_conn=2, auth_type="trust")
    first = await connect(pooler.port, "postgres", None)
    second = await connect(pooler.port, "postgres", None)
    try:
        # PgBouncer's disconnect_client() for max_client_conn: FATAL, its default 08P01.
        with pytest.raises(asyncpg.ProtocolViolationError, match=r"no more connections allowed \(max_client_conn\)"):
            await connect(pooler.port, "postgres", None)
    finally:
        await first.close()
        await second.close()
    # A slot freed: the next client gets in.
    third = await connect(pooler.port, "postgres", None)
    await third.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.read()


def error_code(data: bytes) -> str:
    assert data[:1] == b"E", data
    return backend.parse_error_fields(data[5:])["C"]


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (struct.pack("!ii", 8, 1234), "0A000"),  # unknown protocol version
        (struct.pack("!i", 4), None),  # impossible length: closed without a word, as PostgreSQL
        (struct.pack("!ii", 12, 196608) + b"user", "08P01"),  # unterminated startup
        (build_startup_message({"user": "postgres", "database": "app", "replication": "true"}), "08P01"),
        (build_startup_message({"user": "postgres", "database": "app", "options": "-B 100"}), "0A000"),
    ],
)
async def test_malformed_startup_gets_an_error_and_only_that_client_closes(
    start_pooler: StartPooler, packet: bytes, code: str | None
) -> None:
    pooler = await start_pooler(auth_type="trust")
    bystander = await connect(pooler.port, "postgres", None)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
        writer.write(packet)
        data = await read_until_closed(reader)
        assert (error_code(data) if code is not None else data) == (code if code is not None else b"")
        writer.close()
        assert await bystander.fetchval("SELECT 3") == 3
    finally:
        await bystander.close()


async def test_garbage_after_login_is_a_protocol_violation(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    writer.write(build_startup_message({"user": "postgres", "database": "app"}))
    async with asyncio.timeout(5):
        await reader.readuntil(b"Z\x00\x00\x00\x05I")
    writer.write(b"\x01\x00\x00\x00\x04")  # no such message type
    data = await read_until_closed(reader)
    assert error_code(data) == "08P01"
    writer.close()


async def test_ssl_and_gss_requests_are_answered_N(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    writer.write(build_ssl_request())
    assert await reader.readexactly(1) == b"N"
    writer.write(struct.pack("!ii", 8, 80877104))
    assert await reader.readexactly(1) == b"N"
    writer.write(build_startup_message({"user": "postgres", "database": "app"}))
    async with asyncio.timeout(5):
        await reader.readuntil(b"Z\x00\x00\x00\x05I")
    writer.close()


async def test_client_login_timeout_before_the_startup_packet(start_pooler: StartPooler) -> None:
    """Half a startup packet, then silence: closed at client_login_timeout, as one that
    waits for a password (the login runs inline until it has to wait, under a timer)."""
    pooler = await start_pooler(client_login_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    writer.write(build_startup_message({"user": "postgres", "database": "app"})[:6])
    data = await read_until_closed(reader)
    assert b"client_login_timeout" in data
    writer.close()


async def test_client_login_timeout_ends_each_login_at_its_own_deadline(start_pooler: StartPooler) -> None:
    """Logins that began at different times end each at its own client_login_timeout (one
    timer serves them all): not the later one at the earlier one's deadline, nor ever;
    a client that logged in meanwhile, and an admin console session, stay."""
    timeout = 1.0
    pooler = await start_pooler(client_login_timeout=timeout, admin_users=["md5user"])
    loop = asyncio.get_running_loop()
    admin = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", dbname="pgbouncer", autocommit=True
    )
    first_at = loop.time()
    first_reader, first_writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    try:
        await asyncio.sleep(timeout / 2)  # the second login begins half a timeout later
        second_at = loop.time()
        second_reader, second_writer = await asyncio.open_connection("127.0.0.1", pooler.port)
        try:
            second_writer.write(build_startup_message({"user": "md5user", "database": "app"}))  # asked for a password
            logged_in = await connect(pooler.port, "md5user", "md5pass")
            try:
                assert b"client_login_timeout" in await read_until_closed(first_reader)
                assert loop.time() - first_at >= timeout - 0.05
                assert not second_reader.at_eof()
                assert b"client_login_timeout" in await read_until_closed(second_reader)
                assert loop.time() - second_at >= timeout - 0.05
                assert await logged_in.fetchval("SELECT 1") == 1
                assert await (await admin.execute("SHOW VERSION")).fetchall()
            finally:
                await logged_in.close()
        finally:
            second_writer.close()
    finally:
        first_writer.close()
        await admin.close()


@pytest.mark.parametrize("before", [0, 60], ids=["none before", "a longer one before"])
async def test_a_reload_that_sets_client_login_timeout_ends_logins_under_way(
    start_pooler: StartPooler, before: float
) -> None:
    """The new limit counts from each login's start, as if it had always been in force."""
    pooler = await start_pooler(client_login_timeout=before)
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    writer.write(build_startup_message({"user": "md5user", "database": "app"}))
    async with asyncio.timeout(10):
        assert (await reader.readexactly(1)) == b"R"  # asked for a password: the login is under way
    pooler.apply_config(pooler.config.model_copy(update={"client_login_timeout": 0.5}))
    assert b"client_login_timeout" in await read_until_closed(reader)
    writer.close()


async def test_a_reload_that_changes_the_databases_moves_new_logins(start_pooler: StartPooler) -> None:
    """A login's pool is looked up once per database and user, until the config changes:
    a database taken out of it, or given a forced user, is so for the next login."""
    pooler = await start_pooler(auth_type="trust")
    before = [await connect(pooler.port, "postgres", None, database) for database in ("app", "postgres")]
    try:
        assert [await conn.fetchval("SELECT current_user") for conn in before] == ["postgres", "postgres"]
        databases = {name: db for name, db in pooler.config.databases.items() if name != "postgres"}
        databases["app"] = databases["app"].model_copy(update={"user": "md5user", "password": "md5pass"})
        pooler.apply_config(pooler.config.model_copy(update={"databases": databases}))
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await connect(pooler.port, "postgres", None, "postgres")
        after = await connect(pooler.port, "postgres", None)
        try:
            assert await after.fetchval("SELECT current_user") == "md5user"
        finally:
            await after.close()
    finally:
        for conn in before:
            await conn.close()


async def test_trust_login_in_pieces_is_greeted_once_whole(start_pooler: StartPooler) -> None:
    """A startup packet that arrives a few bytes at a time logs in; the greeting is
    AuthenticationOk, ParameterStatus..., BackendKeyData, ReadyForQuery, in that order."""
    pooler = await start_pooler(auth_type="trust")
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    packet = build_ssl_request() + build_startup_message({"user": "postgres", "database": "app"})
    for start in range(0, len(packet), 7):
        writer.write(packet[start : start + 7])
        await writer.drain()
        await asyncio.sleep(0)
    async with asyncio.timeout(10):
        assert await reader.readexactly(1) == b"N"
        data = await reader.readuntil(b"Z\x00\x00\x00\x05I")
    kinds = []
    pos = 0
    while pos < len(data):
        kinds.append(chr(data[pos]))
        pos += 1 + struct.unpack_from("!i", data, pos + 1)[0]
    assert kinds[0] == "R" and data[5:9] == b"\x00\x00\x00\x00"  # AuthenticationOk
    assert set(kinds[1:-2]) == {"S"} and kinds[-2:] == ["K", "Z"]
    writer.close()


async def test_client_login_timeout(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(client_login_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    writer.write(build_startup_message({"user": "md5user", "database": "app"}))
    data = await read_until_closed(reader)  # asked for a password, never answered
    assert b"client_login_timeout" in data
    writer.close()
