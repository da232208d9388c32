"""TLS on both legs, against a PostgreSQL of its own with ssl = on and hostssl-only pg_hba.

Certificates are made per run (pgfleet.devtools.certs).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import signal
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from pgfleet.devtools.certs import Certs
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import client_env, run_cmd, wait_until
from pgfleet.pooler import cli
from pgfleet.pooler.client import ClientConnection
from pgfleet.pooler.compiled import COMPILED
from pgfleet.pooler.config import SslMode
from pgfleet.pooler.metrics import make_registry
from pgfleet.pooler.protocol.startup import build_ssl_request, build_startup_message
from prometheus_client import generate_latest

from .conftest import PoolerProcess, StartPooler

# hostssl only: a link in the clear finds no pg_hba.conf entry.
TLS_HBA = [
    "hostssl all md5user 127.0.0.1/32 md5",
    "hostssl all certuser 127.0.0.1/32 cert",
    "hostssl all all 127.0.0.1/32 trust",
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_pg(certs: Certs) -> Iterator[TempPostgres]:
    """A PostgreSQL that speaks only TLS over TCP."""
    server = TempPostgres(max_connections=30, tls=certs.postgres_tls(), hba=TLS_HBA)
    server.start()
    server.sql("CREATE ROLE certuser LOGIN")
    try:
        yield server
    finally:
        server.cleanup()


def to_tls_pg(pg: TempPostgres, host: str = "localhost", **entry: Any) -> dict[str, Any]:
    return {"app": {"host": host, "port": pg.port, "dbname": "postgres", **entry}}


def client_tls(certs: Certs, mode: str = "require", **more: Any) -> dict[str, Any]:
    return {
        "client_tls_sslmode": mode,
        "client_tls_key_file": certs.pooler_key,
        "client_tls_cert_file": certs.pooler_cert,
        **more,
    }


async def psql(port: int, conninfo: str, sql: str = "SELECT 1", user: str = "md5user") -> tuple[int, str, str]:
    return await run_cmd(
        "psql", "-X", "-A", "-t", "-d", f"host=127.0.0.1 port={port} user={user} dbname=app {conninfo}", "-c", sql,
        env=client_env("md5pass"),
    )  # fmt: skip


# -- the client leg ---------------------------------------------------------------------------
async def test_psql_require_and_verify_full_reach_the_pooler_over_tls(certs: Certs, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs), admin_users=["md5user"])
    for conninfo in (
        "sslmode=require",
        f"sslmode=verify-full sslrootcert={certs.ca_file}",
        f"host=localhost sslmode=verify-full sslrootcert={certs.ca_file}",
    ):
        code, out, err = await psql(pooler.port, conninfo)
        assert (code, out.strip()) == (0, "1"), (conninfo, err)
    # The admin console shows the TLS version and cipher of each client.
    code, out, err = await run_cmd(
        "psql", "-X", "-A", "-t", "-d",
        f"host=127.0.0.1 port={pooler.port} user=md5user dbname=pgbouncer sslmode=require", "-c", "SHOW CLIENTS",
        env=client_env("md5pass"),
    )  # fmt: skip
    assert code == 0, err
    assert "|TLSv1.3/" in out
    assert pooler.tls_stats.client_handshakes == 4
    assert pooler.tls_stats.client_failures == 0


async def test_asyncpg_and_psycopg_verify_full(certs: Certs, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs))
    context = ssl.create_default_context(cafile=certs.ca_file)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", database="app", ssl=context,
        statement_cache_size=0,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(
        host="localhost", port=pooler.port, user="md5user", password="md5pass", dbname="app",
        sslmode="verify-full", sslrootcert=certs.ca_file,
    ) as pconn:  # fmt: skip
        assert pconn.info.pgconn.ssl_in_use
        cur = await pconn.execute("SELECT %s::text || 'x'", ("a",))
        assert await cur.fetchone() == ("ax",)


async def test_clients_refuse_a_wrong_host_name_an_unknown_ca_and_an_expired_certificate(
    certs: Certs, start_pooler: StartPooler
) -> None:
    pooler = await start_pooler(**client_tls(certs))
    code, _, err = await psql(
        pooler.port, f"host=db.example hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={certs.ca_file}"
    )
    assert code != 0 and 'does not match host name "db.example"' in err, err
    code, _, err = await psql(pooler.port, f"sslmode=verify-ca sslrootcert={certs.other_ca_file}")
    assert code != 0 and "certificate verify failed" in err, err
    expired_cert, expired_key = certs.issue(
        "expired", certs.ca, "127.0.0.1", not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    )
    expired = await start_pooler(
        **client_tls(certs, client_tls_cert_file=expired_cert, client_tls_key_file=expired_key)
    )
    code, _, err = await psql(expired.port, f"sslmode=verify-ca sslrootcert={certs.ca_file}")
    # The same CA and host name as above: only the expiry date fails it.
    assert code != 0 and "certificate verify failed" in err, err
    # The pooler counts the handshakes the clients broke off, and holds no client for them.
    await wait_until(lambda: not pooler.clients and not expired.clients)
    # libpq checks the host name after a complete handshake; the unknown CA breaks one off.
    assert (pooler.tls_stats.client_handshakes, pooler.tls_stats.client_failures) == (1, 1)
    assert expired.tls_stats.client_failures == 1


async def test_require_refuses_a_client_in_the_clear(certs: Certs, tmp_path: Path, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs), unix_socket_dir=str(tmp_path))
    code, _, err = await psql(pooler.port, "sslmode=disable")
    assert code != 0 and "SSL required" in err, err
    # A unix socket never leaves the machine: its clients need no TLS (as with PgBouncer).
    code, out, err = await psql(pooler.port, f"host={tmp_path}")
    assert (code, out.strip()) == (0, "1"), err
    allow = await start_pooler(**client_tls(certs, "allow"))
    for mode in ("disable", "require"):
        code, out, err = await psql(allow.port, f"sslmode={mode}")
        assert (code, out.strip()) == (0, "1"), (mode, err)


async def test_disable_answers_n_as_before(start_pooler: StartPooler) -> None:
    pooler = await start_pooler()
    code, _, err = await psql(pooler.port, "sslmode=require")
    assert code != 0 and "server does not support SSL" in err, err


async def test_verify_ca_asks_clients_for_a_certificate(certs: Certs, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs, "verify-ca", client_tls_ca_file=certs.ca_file))
    code, _, err = await psql(pooler.port, "sslmode=require")
    assert code != 0, err
    code, out, err = await psql(pooler.port, f"sslmode=require sslcert={certs.client_cert} sslkey={certs.client_key}")
    assert (code, out.strip()) == (0, "1"), err
    # Below verify-ca a CA file makes the certificate optional.
    optional = await start_pooler(**client_tls(certs, client_tls_ca_file=certs.ca_file))
    code, out, err = await psql(optional.port, "sslmode=require")
    assert (code, out.strip()) == (0, "1"), err


async def test_bytes_pipelined_behind_sslrequest_are_refused(certs: Certs, start_pooler: StartPooler) -> None:
    """CVE-2021-23214: what came before the handshake cannot be taken as if it came through it."""
    pooler = await start_pooler(**client_tls(certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    try:
        writer.write(build_ssl_request() + build_startup_message({"user": "md5user", "database": "app"}))
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer[:1] == b"E" and b"received unencrypted data after SSL request" in answer
    assert pooler.tls_stats.client_handshakes == 0


async def test_a_failed_handshake_costs_other_clients_nothing(certs: Certs, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    try:
        writer.write(build_ssl_request())
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"S"
        writer.write(struct.pack("!i", 8) + b"garbage!" * 8)  # not a ClientHello
        assert await asyncio.wait_for(reader.read(), 10) is not None
    finally:
        writer.close()
    await wait_until(lambda: pooler.tls_stats.client_failures == 1 and not pooler.clients)
    code, out, err = await psql(pooler.port, "sslmode=require")
    assert (code, out.strip()) == (0, "1"), err


async def test_client_login_timeout_holds_through_and_after_the_handshake(
    certs: Certs, start_pooler: StartPooler
) -> None:
    """The handshake runs in a task and the login then goes on inline, under the timer
    again: a client silent after 'S', or after the handshake, is dropped at
    client_login_timeout, and a startup packet that comes in pieces after the handshake
    still logs in. No session tickets are sent."""
    pooler = await start_pooler(**client_tls(certs), auth_type="trust", client_login_timeout=0.5)
    context = direct_context(certs)
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
    try:
        writer.write(build_ssl_request())
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"S"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # no ClientHello: closed
    finally:
        writer.close()
    for pieces in (0, 7):
        reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
        try:
            writer.write(build_ssl_request())
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"S"
            await writer.start_tls(context, server_hostname="localhost")
            if not pieces:
                answer = await asyncio.wait_for(reader.read(1000), 10)
                assert answer[:1] == b"E" and b"client_login_timeout" in answer, answer
                continue
            packet = build_startup_message({"user": "postgres", "database": "app"})
            for start in range(0, len(packet), pieces):
                writer.write(packet[start : start + pieces])
                await writer.drain()
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                greeting = await reader.readuntil(b"Z\x00\x00\x00\x05I")
            assert greeting[:9] == b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # AuthenticationOk
            # No session ticket came with it, as from PostgreSQL: no driver resumes a session.
            session = writer.get_extra_info("ssl_object").session
            assert session is None or not session.has_ticket
        finally:
            writer.close()
    assert pooler.tls_stats.client_handshakes == 2


def direct_context(certs: Certs, *alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca_file)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


async def direct_tls_login(port: int, context: ssl.SSLContext) -> bytes:
    """Open with a ClientHello (no SSLRequest), send a startup packet, return what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(build_startup_message({"user": "md5user", "database": "app"}))
        return await asyncio.wait_for(reader.read(1000), 10)
    finally:
        writer.close()


async def test_direct_tls_with_alpn_postgresql_on_the_same_port(certs: Certs, start_pooler: StartPooler) -> None:
    """PostgreSQL 17's sslnegotiation=direct: a ClientHello first, ALPN `postgresql` required."""
    pooler = await start_pooler(**client_tls(certs, "prefer"))
    async with await psycopg.AsyncConnection.connect(
        host="localhost", port=pooler.port, user="md5user", password="md5pass", dbname="app",
        sslmode="verify-full", sslrootcert=certs.ca_file, sslnegotiation="direct",
    ) as conn:  # fmt: skip
        assert conn.info.pgconn.ssl_in_use
        cur = await conn.execute("SELECT %s::int + 1", (41,))
        assert await cur.fetchone() == (42,)
    # Over the raw socket: the authentication request comes back through TLS.
    answer = await direct_tls_login(pooler.port, direct_context(certs, "postgresql"))
    assert answer[:1] == b"R", answer
    # The same port still negotiates by SSLRequest, and in the clear where the mode allows.
    for conninfo in ("sslmode=require", "sslmode=disable"):
        code, out, err = await psql(pooler.port, conninfo)
        assert (code, out.strip()) == (0, "1"), (conninfo, err)
    assert pooler.tls_stats.client_handshakes == 3
    assert pooler.tls_stats.client_failures == 0


async def test_direct_tls_without_alpn_postgresql_is_refused(certs: Certs, start_pooler: StartPooler) -> None:
    """As PostgreSQL 17: a direct TLS connection that does not name ALPN `postgresql` (not
    libpq, maybe a client of another protocol pointed at the wrong port) goes no further."""
    pooler = await start_pooler(**client_tls(certs))
    for alpn in ((), ("http/1.1",)):
        answer = await direct_tls_login(pooler.port, direct_context(certs, *alpn))
        assert answer[:1] == b"E", (alpn, answer)
        assert b"without ALPN protocol negotiation extension" in answer, answer
    code, out, err = await psql(pooler.port, "sslmode=require")
    assert (code, out.strip()) == (0, "1"), err


async def test_direct_tls_without_client_tls_is_not_a_startup_packet(start_pooler: StartPooler) -> None:
    """client_tls_sslmode disable: a ClientHello is garbage in place of a startup packet, as
    for a PostgreSQL with ssl = off; the connection closes and nothing else is disturbed."""
    pooler = await start_pooler()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await direct_tls_login(pooler.port, ssl._create_unverified_context())
    await wait_until(lambda: not pooler.clients)
    code, out, err = await psql(pooler.port, "sslmode=disable")
    assert (code, out.strip()) == (0, "1"), err


def test_direct_tls_under_the_production_loop(certs: Certs, pooler_process: Callable[..., PoolerProcess]) -> None:
    """The real pooler process (uvloop): psycopg with sslnegotiation=direct and verify-full."""
    proc = pooler_process(**client_tls(certs, "verify-full", client_tls_ca_file=certs.ca_file))
    with psycopg.connect(
        host="localhost", port=proc.port, user="md5user", password="md5pass", dbname="app",
        sslmode="verify-full", sslrootcert=certs.ca_file, sslnegotiation="direct",
        sslcert=certs.client_cert, sslkey=certs.client_key,
    ) as conn:  # fmt: skip
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)


async def test_login_and_logout_lines_name_each_clients_address_under_the_production_loop(
    certs: Certs, pooler_process: Callable[..., PoolerProcess]
) -> None:
    """An idle client does not keep its peer's address: the logout line asks the transport,
    which a TLS transport can no longer answer after the close (it is kept aside for TLS)."""
    proc = pooler_process(**client_tls(certs, "allow"), log_connections=True, log_disconnections=True)
    ports = []
    for sslmode in ("require", "disable"):
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=proc.port, user="md5user", password="md5pass", dbname="app", sslmode=sslmode
        ) as conn:
            assert conn.info.pgconn.ssl_in_use == (sslmode == "require")
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
            with socket.socket(fileno=os.dup(conn.info.pgconn.socket)) as sock:
                ports.append(sock.getsockname()[1])
    for port in ports:
        for line in (f"login: md5user@app from 127.0.0.1:{port}", f"logout: md5user@app from 127.0.0.1:{port}"):
            await wait_until(lambda line=line: line in proc.log())  # type: ignore[misc]


# -- the server leg ----------------------------------------------------------------------------
async def test_transactions_share_one_tls_handshake_per_server(
    certs: Certs, tls_pg: TempPostgres, start_pooler: StartPooler
) -> None:
    pooler = await start_pooler(
        server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca_file, default_pool_size=1,
        databases=to_tls_pg(tls_pg), admin_users=["md5user"],
    )  # fmt: skip
    for _ in range(3):
        code, out, err = await psql(pooler.port, "", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert (code, out.strip()) == (0, "t"), err
    assert (pooler.tls_stats.server_handshakes, pooler.tls_stats.server_failures) == (1, 0)
    (server,) = pooler.pools["app", "md5user"].idle
    assert server.tls.startswith("TLSv1.3/")
    code, out, err = await run_cmd(
        "psql", "-X", "-A", "-t", "-d", f"host=127.0.0.1 port={pooler.port} user=md5user dbname=pgbouncer",
        "-c", "SHOW SERVERS", env=client_env("md5pass"),
    )  # fmt: skip
    assert code == 0 and f"|{server.tls}|" in out, err + out


async def test_verify_full_refuses_a_wrong_host_name_and_verify_ca_an_unknown_ca(
    certs: Certs, tls_pg: TempPostgres, start_pooler: StartPooler
) -> None:
    wrong_host = await start_pooler(
        server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca_file, databases=to_tls_pg(tls_pg, "127.0.0.1")
    )
    code, _, err = await psql(wrong_host.port, "")
    assert code != 0 and "IP address mismatch" in err, err
    # verify-ca checks the chain only: the same host name is fine.
    ca_only = await start_pooler(
        server_tls_sslmode="verify-ca", server_tls_ca_file=certs.ca_file, databases=to_tls_pg(tls_pg, "127.0.0.1")
    )
    code, out, err = await psql(ca_only.port, "")
    assert (code, out.strip()) == (0, "1"), err
    unknown_ca = await start_pooler(
        server_tls_sslmode="verify-ca", server_tls_ca_file=certs.other_ca_file, databases=to_tls_pg(tls_pg)
    )
    code, _, err = await psql(unknown_ca.port, "")
    assert (
        code != 0
        and "server certificate refused (server_tls_sslmode verify-ca): self-signed certificate in certificate chain"
        in err
    ), err
    assert unknown_ca.tls_stats.server_failures >= 1


async def test_require_refuses_a_server_without_tls_and_disable_meets_hostssl(
    pg: TempPostgres, tls_pg: TempPostgres, start_pooler: StartPooler
) -> None:
    required = await start_pooler(server_tls_sslmode="require")  # the session's server has ssl = off
    code, _, err = await psql(required.port, "")
    assert code != 0 and "server_tls_sslmode is require and the server does not offer TLS" in err, err
    prefer = await start_pooler()  # prefer, PgBouncer's default: in the clear when the server has no TLS
    code, out, err = await psql(prefer.port, "")
    assert (code, out.strip()) == (0, "1"), err
    cleartext = await start_pooler(server_tls_sslmode="disable", databases=to_tls_pg(tls_pg))
    code, _, err = await psql(cleartext.port, "")
    assert code != 0 and "no encryption" in err, err


async def test_client_certificate_to_postgresql(certs: Certs, tls_pg: TempPostgres, start_pooler: StartPooler) -> None:
    """server_tls_key_file/cert_file log in where pg_hba says `cert` (CN = user name)."""
    pooler = await start_pooler(
        auth_type="any", server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca_file,
        server_tls_cert_file=certs.client_cert, server_tls_key_file=certs.client_key, databases=to_tls_pg(tls_pg),
    )  # fmt: skip
    code, out, err = await psql(pooler.port, "", "SELECT current_user", user="certuser")
    assert (code, out.strip()) == (0, "certuser"), err
    without = await start_pooler(auth_type="any", server_tls_sslmode="require", databases=to_tls_pg(tls_pg))
    code, _, err = await psql(without.port, "", "SELECT current_user", user="certuser")
    assert code != 0 and "certificate" in err, err


async def test_cancel_reaches_a_tls_server(certs: Certs, tls_pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(
        server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca_file, databases=to_tls_pg(tls_pg)
    )
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", database="app", ssl=False,
        statement_cache_size=0,
    )  # fmt: skip
    try:
        with pytest.raises(TimeoutError):
            # asyncpg sends a CancelRequest when the timeout passes, and waits for its answer.
            await conn.execute("SELECT pg_sleep(60)", timeout=1)
        # Cancelled on the server: the link answers at once, not after the minute.
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 20) == 1
    finally:
        await conn.close()
    # One handshake for the link, one for the cancel request's own connection.
    await wait_until(lambda: pooler.tls_stats.server_handshakes == 2 and not pooler._cancel_tasks)


# -- configuration: what cannot be honoured is an error, never cleartext ---------------------------
def check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], **settings: Any) -> tuple[int, str]:
    path = tmp_path / "pooler.yaml"
    path.write_text(yaml.safe_dump({"auth_type": "trust", **settings}))
    code = cli.main(["--check-config", str(path)])
    return code, capsys.readouterr().err


def test_check_config_names_the_tls_setting_that_cannot_be_honoured(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nowhere.key")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"client_tls_sslmode": "require"}, "client_tls_sslmode require needs client_tls_key_file"),
        (client_tls(certs, client_tls_key_file=missing), f"client_tls_key_file: cannot read {missing}"),
        (client_tls(certs, client_tls_key_file=str(tmp_path)), "client_tls_key_file: cannot read"),
        (client_tls(certs, client_tls_key_file=certs.client_key), "not a PEM certificate and its matching key"),
        (client_tls(certs, "verify-full"), "client_tls_sslmode verify-full needs client_tls_ca_file"),
        (client_tls(certs, client_tls_protocols="tlsv2"), "client_tls_protocols: unknown TLS protocol 'tlsv2'"),
        (client_tls(certs, client_tls_ciphers="NO-SUCH-CIPHER"), "client_tls_ciphers: no cipher matches"),
        ({"server_tls_sslmode": "verify-ca", "server_tls_ca_file": missing}, "server_tls_ca_file: cannot read"),
        ({"server_tls_cert_file": certs.client_cert}, "server_tls_key_file and server_tls_cert_file go together"),
    ]
    for settings, message in cases:
        code, err = check_config(tmp_path, capsys, **settings)
        assert code == 2 and message in err, (settings, err)
    code, err = check_config(tmp_path, capsys, **client_tls(certs, "verify-full", client_tls_ca_file=certs.ca_file))
    assert code == 0, err


async def test_reload_reads_rotated_certificates_and_refuses_broken_ones(
    certs: Certs, tmp_path: Path, pooler_process: Callable[..., PoolerProcess]
) -> None:
    """A rotated certificate serves new handshakes after SIGHUP; connected clients stay.
    A reload whose files cannot be used is refused and logged; the running TLS stays."""
    cert_file, key_file = tmp_path / "pooler.crt", tmp_path / "pooler.key"
    shutil.copyfile(certs.pooler_cert, cert_file)
    shutil.copyfile(certs.pooler_key, key_file)
    proc = pooler_process(**client_tls(certs, client_tls_cert_file=str(cert_file), client_tls_key_file=str(key_file)))
    old_ca = f"sslmode=verify-full sslrootcert={certs.ca_file}"
    new_ca = f"sslmode=verify-full sslrootcert={certs.other_ca_file}"
    async with await psycopg.AsyncConnection.connect(
        f"host=127.0.0.1 port={proc.port} user=md5user password=md5pass dbname=app {old_ca}"
    ) as kept:
        rotated_cert, rotated_key = certs.issue("rotated", certs.other_ca, "127.0.0.1")
        shutil.copyfile(rotated_cert, cert_file)
        shutil.copyfile(rotated_key, key_file)
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "configuration reloaded" in proc.log())
        code, out, err = await psql(proc.port, new_ca)
        assert (code, out.strip()) == (0, "1"), err
        code, _, err = await psql(proc.port, old_ca)
        assert code != 0 and "certificate verify failed" in err, err
        cur = await kept.execute("SELECT 2")
        assert await cur.fetchone() == (2,)

        key_file.write_text("not a key")
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "reload failed" in proc.log())
        assert "client_tls_cert_file/client_tls_key_file" in proc.log()
        code, out, err = await psql(proc.port, new_ca)
        assert (code, out.strip()) == (0, "1"), err


@pytest.mark.skipif(COMPILED, reason="patches a method that the compiled class calls directly")
async def test_a_reload_turning_tls_off_as_a_handshake_is_handed_off_leaves_no_client_hanging(
    certs: Certs, start_pooler: StartPooler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS was offered to the SSLRequest, then a RELOAD turns it off before the handshake's
    task takes its first step: that handshake goes on with the context it was offered."""
    pooler = await start_pooler(**client_tls(certs), client_login_timeout=30)
    hand_off = ClientConnection._hand_off_tls

    def hand_off_then_reload(client: ClientConnection, *args: Any, **kwargs: Any) -> None:
        hand_off(client, *args, **kwargs)
        pooler.apply_config(pooler.config.model_copy(update={"client_tls_sslmode": SslMode.DISABLE}))

    monkeypatch.setattr(ClientConnection, "_hand_off_tls", hand_off_then_reload)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", database="app", ssl="require",
        statement_cache_size=0, timeout=10,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert pooler.client_tls_context is None  # the reload took: later clients are refused TLS


async def test_certificates_rotated_on_disk_serve_new_handshakes_without_a_reload(
    certs: Certs, tmp_path: Path, start_pooler: StartPooler
) -> None:
    """As a Kubernetes Secret volume rotates them: the pooler notices the files changed."""
    cert_file, key_file = tmp_path / "pooler.crt", tmp_path / "pooler.key"
    shutil.copyfile(certs.pooler_cert, cert_file)
    shutil.copyfile(certs.pooler_key, key_file)
    pooler = await start_pooler(
        **client_tls(certs, client_tls_cert_file=str(cert_file), client_tls_key_file=str(key_file))
    )
    before = pooler.tls
    code, out, err = await psql(pooler.port, f"sslmode=verify-full sslrootcert={certs.ca_file}")
    assert (code, out.strip()) == (0, "1"), err
    rotated_cert, rotated_key = certs.issue("rotated-on-disk", certs.other_ca, "127.0.0.1")
    shutil.copyfile(rotated_key, key_file)
    shutil.copyfile(rotated_cert, cert_file)
    await wait_until(lambda: pooler.tls is not before)
    code, out, err = await psql(pooler.port, f"sslmode=verify-full sslrootcert={certs.other_ca_file}")
    assert (code, out.strip()) == (0, "1"), err


async def test_metrics_count_handshakes_and_failures(certs: Certs, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**client_tls(certs))
    code, _, err = await psql(pooler.port, "sslmode=require")
    assert code == 0, err
    code, _, err = await psql(pooler.port, f"sslmode=verify-ca sslrootcert={certs.other_ca_file}")
    assert code != 0
    await wait_until(lambda: pooler.tls_stats.client_failures == 1)
    text = generate_latest(make_registry(pooler)).decode()
    assert 'pgfleet_tls_handshakes_total{side="client"} 1.0' in text
    assert 'pgfleet_tls_handshake_failures_total{side="client"} 1.0' in text
    assert 'pgfleet_tls_handshakes_total{side="server"} 0.0' in text
