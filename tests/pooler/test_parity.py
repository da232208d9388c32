"""PgBouncer parity: behaviours a PgBouncer user relies on, each against a real PostgreSQL.

Each test names the PgBouncer behaviour it holds pgfleet to (docs/compatibility.md lists
them all, with the deliberate differences).
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import run_cmd, wait_until
from pgfleet.pooler.config import load_config
from pgfleet.pooler.pool import Pool
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.startup import build_cancel_request, build_startup_message

from .conftest import PoolerProcess, StartPooler, own_app, pooler_settings
from .rawpg import RawClient, error, rows
from .test_admin import ADMIN_SETTINGS, admin_connect, admin_rows
from .test_admin_commands import app_connect


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


# -- 2. queued clients hear of a server login that starts failing ---------------------------------


@pytest.fixture
def password_role(pg: TempPostgres) -> Iterator[str]:
    """A role of this test's own that PostgreSQL checks the password of (password 'pw1')."""
    name = f"r_{uuid.uuid4().hex[:10]}"
    pg.sql(f"CREATE ROLE {name} LOGIN SUPERUSER PASSWORD 'pw1'")
    hba = pg.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n{original}")
    pg.sql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while subprocess.run(["psql", pg.dsn(name), "-Atc", "select 1"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "pg_hba.conf reload not seen"
        time.sleep(0.05)
    try:
        yield name
    finally:
        hba.write_text(original)
        pg.sql("SELECT pg_reload_conf()")
        pg.sql(f"DROP ROLE IF EXISTS {name}")


def forced_db(pg: TempPostgres, role: str, password: str = "pw1", **extra: Any) -> dict[str, Any]:
    return {"forced": {"host": pg.host, "port": pg.port, "dbname": "app", "user": role, "password": password, **extra}}


def pool_of(pooler: Pooler, database: str) -> Pool:
    [pool] = [pool for (db, _user), pool in pooler.pools.items() if db == database]
    return pool


async def test_queued_clients_get_the_servers_login_error_promptly(
    pg: TempPostgres, start_pooler: StartPooler, password_role: str
) -> None:
    """PgBouncer fails the clients queued in a pool with the server's own login error."""
    pooler = await start_pooler(
        **ADMIN_SETTINGS, default_pool_size=1, query_wait_timeout=60, databases=forced_db(pg, password_role)
    )
    holder = await app_connect(pooler, "forced")
    queued = [await app_connect(pooler, "forced") for _ in range(3)]
    admin = await admin_connect(pooler)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1")
        tasks = [asyncio.create_task(conn.fetchval("SELECT 1")) for conn in queued]
        await wait_until(lambda: len(pool_of(pooler, "forced").waiting) == 3)
        await asyncio.to_thread(pg.sql, f"ALTER ROLE {password_role} PASSWORD 'changed'")
        await admin.execute("RECONNECT")
        await admin.execute("SET default_pool_size = 2")
        async with asyncio.timeout(10):  # well below query_wait_timeout
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            assert isinstance(result, asyncpg.PostgresError), result
            assert "password authentication failed" in str(result)
        # The client in its transaction is not cut.
        assert await holder.fetchval("SELECT 2") == 2
        await tx.rollback()
        # The password is put right: once server_login_retry (1 s here) has passed, the next
        # login succeeds, and the cached error is gone with it.
        await asyncio.to_thread(pg.sql, f"ALTER ROLE {password_role} PASSWORD 'pw1'")
        deadline = time.monotonic() + 15
        while True:
            try:
                fresh = await app_connect(pooler, "forced")
                assert await fresh.fetchval("SELECT 3") == 3
                await fresh.close()
                break
            except asyncpg.PostgresError as exc:
                assert "password authentication failed" in str(exc)
                assert time.monotonic() < deadline, "the cached login error outlived the fix"
                await asyncio.sleep(0.1)
        assert pool_of(pooler, "forced").last_error is None
    finally:
        await admin.close()
        for conn in [holder, *queued]:
            conn.terminate()


# -- 7. a database that is down or restarting costs clients latency, not errors -------------------


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL this test may stop and start (the session's is shared)."""
    with TempPostgres(max_connections=20) as server:
        yield server


async def trust_connect(port: int, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database=database, statement_cache_size=0
    )


async def test_a_restarting_database_queues_clients_and_serves_them_when_back(
    own_pg: TempPostgres, start_pooler: StartPooler
) -> None:
    """PgBouncer queues clients while the database is down, retries, and says so with a NOTICE."""
    pooler = await start_pooler(
        auth_type="trust",
        server_login_retry=1,
        query_wait_timeout=60,
        query_wait_notify=0.2,
        databases={"flaky": {"host": own_pg.host, "port": own_pg.port, "dbname": "postgres"}},
    )
    conn = await trust_connect(pooler.port, "flaky")
    assert await conn.fetchval("SELECT 1") == 1
    # A session straight to PostgreSQL keeps a smart shutdown going: meanwhile every login
    # is refused with 57P03 "the database system is shutting down".
    direct = await asyncpg.connect(own_pg.dsn())
    pg_ctl = [str(own_pg.bindir / "pg_ctl"), "-D", str(own_pg.datadir), "-m", "smart", "-W", "stop"]
    await asyncio.to_thread(subprocess.run, own_pg._cmd(*pg_ctl), check=True, capture_output=True)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await wait_until(lambda: "smart shutdown request" in own_pg.log())
        pool = pool_of(pooler, "flaky")
        pool.close_idle(len(pool.idle))  # as RECONNECT: the next transactions need a new login
        queued = asyncio.create_task(conn.fetchval("SELECT 42"))
        fresh = await trust_connect(pooler.port, "flaky")  # logs in on the parameters the pool knows
        second = asyncio.create_task(fresh.fetchval("SELECT 43"))
        # Both wait (the database refused logins meanwhile), hear why, and are not failed.
        await wait_until(lambda: bool(notices), timeout=15)
        assert "client being queued" in notices[0]
        assert "shutting down" in own_pg.log()
        assert not queued.done() and not second.done()
        # The shutdown completes, the database starts again: both are served.
        await direct.close()
        await wait_until(lambda: not (own_pg.datadir / "postmaster.pid").exists(), timeout=30)
        await asyncio.to_thread(own_pg.restart_server)
        async with asyncio.timeout(15):
            assert await queued == 42
            assert await second == 43
        await fresh.close()
    finally:
        conn.terminate()
        if not direct.is_closed():
            direct.terminate()


async def test_a_database_that_does_not_exist_fails_at_once(start_pooler: StartPooler, pg: TempPostgres) -> None:
    """A failure no retry can cure is reported at once, with PostgreSQL's own error."""
    pooler = await start_pooler(
        auth_type="trust",
        query_wait_timeout=60,
        databases={"ghost": {"host": pg.host, "port": pg.port, "dbname": "no_such_database"}},
    )
    started = time.monotonic()
    for _ in range(2):  # the first client meets the error, the next one its cached copy
        with pytest.raises(asyncpg.InvalidCatalogNameError, match="no_such_database"):
            await trust_connect(pooler.port, "ghost")
    assert time.monotonic() - started < 10


# -- 4. RELOAD of a database entry that leads elsewhere -------------------------------------------


@pytest.fixture
async def file_pooler(pg: TempPostgres, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Pooler]]]:
    """A pooler started from a config file (for RELOAD); `write(**settings)` rewrites the file."""
    started: list[Pooler] = []
    path = tmp_path / "pooler.yaml"

    async def start(**overrides: Any) -> Pooler:
        path.write_text(yaml.safe_dump(pooler_settings(pg, tmp_path, **overrides)))
        pooler = Pooler(load_config(path), str(path))
        await pooler.start()
        started.append(pooler)
        return pooler

    yield start
    for pooler in started:
        await pooler.stop()


def rewrite_config(pooler: Pooler, **changes: Any) -> None:
    assert pooler.config_path is not None
    path = Path(pooler.config_path)
    settings = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if key == "databases":
            settings["databases"].update(value)
        else:
            settings[key] = value
    path.write_text(yaml.safe_dump(settings))


async def test_reload_closes_servers_whose_database_entry_changed(
    pg: TempPostgres, file_pooler: Callable[..., Awaitable[Pooler]], fresh_db: str
) -> None:
    """PgBouncer closes servers whose connection settings changed at RELOAD."""
    pooler = await file_pooler(**ADMIN_SETTINGS, databases=own_app(pg, fresh_db))
    client = await app_connect(pooler)
    admin = await admin_connect(pooler)
    try:
        assert await client.fetchval("SELECT current_database()") == fresh_db
        rewrite_config(pooler, databases={"app": {"host": pg.host, "port": pg.port, "dbname": "postgres"}})
        await admin.execute("RELOAD")
        assert await client.fetchval("SELECT current_database()") == "postgres"
        # The old target's server is gone from PostgreSQL too, not merely set aside.
        await wait_until(lambda: pg.client_backends(dbname=fresh_db) == 0)
    finally:
        await admin.close()
        await client.close()


# -- 5 and 10. a forced user's database has one pool: the forced user's ----------------------------


async def test_a_forced_users_pool_takes_the_forced_users_settings(pg: TempPostgres, start_pooler: StartPooler) -> None:
    """PgBouncer: the pool of a database with user= belongs to that user ([users] pool_size)."""
    pooler = await start_pooler(
        databases={"forced": {"host": pg.host, "port": pg.port, "dbname": "app", "user": "postgres"}},
        users={"md5user": {"pool_size": 1}, "scramuser": {"pool_size": 1}, "postgres": {"pool_size": 3}},
    )
    md5 = [await app_connect(pooler, "forced") for _ in range(3)]
    scram = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="forced"
    )
    try:
        txs = [conn.transaction() for conn in md5]
        for tx in txs:
            await tx.start()  # three transactions at once: the forced user's pool_size, not md5user's 1
        pids = {await conn.fetchval("SELECT pg_backend_pid()") for conn in md5}
        assert len(pids) == 3
        assert list(pooler.pools) == [("forced", "postgres")]
        # Each client is still its login user's (SHOW CLIENTS, max_user_client_connections).
        clients = pooler.pools[("forced", "postgres")].clients.values()
        assert sorted(client.user for client in clients) == ["md5user"] * 3 + ["scramuser"]
        assert {client.database for client in clients} == {"forced"}
        assert (pooler.user_clients["md5user"], pooler.user_clients["scramuser"]) == (3, 1)
        waiting = asyncio.create_task(scram.fetchval("SELECT 1"))  # the same pool, full
        await wait_until(lambda: len(pooler.pools[("forced", "postgres")].waiting) == 1)
        await txs[0].commit()
        assert await waiting == 1
    finally:
        for conn in [*md5, scram]:
            conn.terminate()


async def test_min_pool_size_fills_a_forced_users_pool_before_any_client(
    pg: TempPostgres, start_pooler: StartPooler, fresh_db: str
) -> None:
    """PgBouncer opens min_pool_size servers for a forced-user database at start."""
    await start_pooler(
        min_pool_size=2,
        databases={"forced": {"host": pg.host, "port": pg.port, "dbname": fresh_db, "user": "postgres"}},
    )
    await wait_until(lambda: pg.client_backends(dbname=fresh_db) == 2)


# -- 3 and 8. SHUTDOWN WAIT_FOR_*: nobody is stranded, the console stays reachable ----------------


async def unix_admin(directory: Path, port: int) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host=str(directory), port=port, user="md5user", password="md5pass", dbname="pgbouncer", autocommit=True
    )


async def test_shutdown_wait_for_servers_answers_an_idle_client_at_once(
    start_pooler: StartPooler, tmp_path: Path
) -> None:
    """PgBouncer answers a client wanting a server during WAIT_FOR_SERVERS with 08P01 "server shutting down"."""
    pooler = await start_pooler(**ADMIN_SETTINGS, unix_socket_dir=str(tmp_path))
    busy = await app_connect(pooler)
    idle = await app_connect(pooler)
    admin = await admin_connect(pooler)
    try:
        tx = busy.transaction()
        await tx.start()
        await busy.execute("SELECT 1")
        await admin.execute("SHUTDOWN WAIT_FOR_SERVERS")
        async with asyncio.timeout(5):
            # (asyncpg reports a FATAL that arrives unasked as a closed connection, with its text)
            with pytest.raises(
                (asyncpg.ProtocolViolationError, asyncpg.ConnectionDoesNotExistError), match="server shutting down"
            ):
                await idle.fetchval("SELECT 1")
        # The console stays reachable over the unix socket while the server is still out.
        async with await unix_admin(tmp_path, pooler.config.listen_port) as late:
            _, rows = await admin_rows(late, "SHOW STATE")
            assert rows
        assert not pooler._stopped.done()
        # The transaction in flight finishes; then the pooler exits.
        assert await busy.fetchval("SELECT 2") == 2
        await tx.commit()
        await asyncio.wait_for(pooler.wait_stopped(), 5)
    finally:
        await admin.close()
        busy.terminate()
        idle.terminate()


async def test_the_console_outlives_a_wait_for_clients_shutdown_until_the_last_client_leaves(
    start_pooler: StartPooler, tmp_path: Path
) -> None:
    """PgBouncer 1.25: admin sessions, and new ones over the unix socket, during SHUTDOWN WAIT_FOR_CLIENTS."""
    pooler = await start_pooler(**ADMIN_SETTINGS, unix_socket_dir=str(tmp_path))
    busy = await app_connect(pooler)
    admin = await admin_connect(pooler)
    try:
        tx = busy.transaction()
        await tx.start()
        await admin.execute("SHUTDOWN WAIT_FOR_CLIENTS")
        # The session that asked is still served, and a new one gets in over the unix socket.
        _, rows = await admin_rows(admin, "SHOW STATE")
        assert rows
        late = await unix_admin(tmp_path, pooler.config.listen_port)
        _, clients = await admin_rows(late, "SHOW CLIENTS")
        assert any(row[2] == "app" for row in clients)
        # Application clients are not let in, on either socket.
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await app_connect(pooler)
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            await psycopg.AsyncConnection.connect(
                host=str(tmp_path), port=pooler.config.listen_port, user="md5user", password="md5pass", dbname="app"
            )
        await tx.commit()  # the last application client leaves at its transaction's end
        await asyncio.wait_for(pooler.wait_stopped(), 5)
        await late.close()
    finally:
        await admin.close()
        busy.terminate()


# -- 8. signals, as PgBouncer's -------------------------------------------------------------------


async def show_state(port: int) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="pgbouncer", autocommit=True
    ) as admin:
        _, rows = await admin_rows(admin, "SHOW STATE")
        return dict(rows)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_pauses_and_sigusr2_resumes(pooler_process: Callable[..., PoolerProcess], workers: int) -> None:
    """PgBouncer's runbook: kill -USR1 is PAUSE, kill -USR2 is RESUME (they used to kill pgfleet)."""
    proc = pooler_process(auth_type="trust", workers=workers, admin_users=["postgres"])
    conn = await trust_connect(proc.port, "app")
    try:
        assert await conn.fetchval("SELECT 1") == 1
        proc.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while (await show_state(proc.port))["paused"] != "yes":
            assert time.monotonic() < deadline, "SIGUSR1 did not pause"
            await asyncio.sleep(0.05)
        held = asyncio.create_task(conn.fetchval("SELECT 2"))
        done, _ = await asyncio.wait({held}, timeout=0.3)
        assert not done, "a transaction got a server while paused"
        proc.signal(signal.SIGUSR2)
        assert await asyncio.wait_for(held, 10) == 2
        assert proc.proc.poll() is None
    finally:
        conn.terminate()


def test_sigquit_exits_at_once_also_when_started_with_signals_ignored(pg: TempPostgres, tmp_path: Path) -> None:
    """A non-interactive shell starts background jobs with SIGINT and SIGQUIT ignored; QUIT still stops."""
    path = tmp_path / "pooler.yaml"
    path.write_text(yaml.safe_dump(pooler_settings(pg, tmp_path, auth_type="trust")))
    log_path = tmp_path / "pooler.log"

    # As a shell script's background job: the signals ignored, then the pooler exec'd.
    command = f"trap '' INT QUIT USR1 USR2; exec {shlex.quote(sys.executable)} -m pgfleet.pooler --config {path}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while "ready on" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # handled (PAUSE), not ignored and not fatal
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(10) == 0
        assert "SIGUSR1: pausing" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 11 and 14. client time limits: PgBouncer's 08P01, per user and per database -------------------


async def psycopg_app(pooler: Pooler, user: str = "md5user", password: str = "md5pass") -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user=user, password=password, dbname="app", autocommit=True
    )


async def closed_with(conn: psycopg.AsyncConnection[Any], sql: str) -> psycopg.Error:
    with pytest.raises(psycopg.OperationalError) as info:
        async with asyncio.timeout(15):
            await conn.execute(sql)
    return info.value


async def test_query_timeout_closes_the_client_with_08p01(start_pooler: StartPooler) -> None:
    """PgBouncer closes a client past query_timeout with 08P01 "query timeout" (drivers reconnect on it)."""
    pooler = await start_pooler(query_timeout=0.5)
    conn = await psycopg_app(pooler)
    error = await closed_with(conn, "SELECT pg_sleep(10)")
    assert error.sqlstate == "08P01" and "query timeout" in str(error)
    assert conn.closed
    async with await psycopg_app(pooler) as again:  # the pool is fine; the next client is served
        assert await (await again.execute("SELECT 1")).fetchone() == (1,)


async def test_idle_transaction_timeout_closes_the_client_with_08p01(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(idle_transaction_timeout=0.3)
    conn = await psycopg_app(pooler)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1")
    await wait_until(lambda: not pooler.pools[("app", "md5user")].clients)
    error = await closed_with(conn, "SELECT 1")  # the FATAL waits in the socket for the next read
    assert error.sqlstate == "08P01" and "idle transaction timeout" in str(error)


async def test_time_limits_per_user_and_per_database(start_pooler: StartPooler, pg: TempPostgres) -> None:
    """PgBouncer 1.24+ sets query_timeout & co per user; the database's entry has its own too."""
    pooler = await start_pooler(
        users={"md5user": {"query_timeout": 0.5}},
        databases={"app": {"host": pg.host, "port": pg.port, "dbname": "app", "transaction_timeout": 1.5}},
    )
    limited = await psycopg_app(pooler)
    other = await psycopg_app(pooler, "scramuser", "scrampass")
    try:
        error = await closed_with(limited, "SELECT pg_sleep(10)")
        assert "query timeout" in str(error)
        # Another user's query outlives md5user's limit; the database's transaction_timeout ends its transaction.
        await other.execute("SELECT pg_sleep(1)")
        await other.execute("BEGIN")
        # The client waits on a query when the limit strikes: a client writing at that moment could
        # meet the close as a reset and lose the FATAL (as with PostgreSQL and PgBouncer).
        error = await closed_with(other, "SELECT pg_sleep(10)")
        assert error.sqlstate == "08P01" and "transaction timeout" in str(error)
    finally:
        await limited.close()
        await other.close()


async def test_server_lifetime_per_database(start_pooler: StartPooler, pg: TempPostgres) -> None:
    pooler = await start_pooler(
        server_lifetime=3600, databases={"app": {"host": pg.host, "port": pg.port, "server_lifetime": 0.3}}
    )
    async with await psycopg_app(pooler) as conn:
        first = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        deadline = time.monotonic() + 10
        while await (await conn.execute("SELECT pg_backend_pid()")).fetchone() == first:
            assert time.monotonic() < deadline, "the database's server_lifetime was not applied"
            await asyncio.sleep(0.1)


# -- 14 and 17. a pgbouncer.ini written for 1.24+ loads; what is not implemented never stops a RELOAD --


PGBOUNCER_125_INI = """
[databases]
app = host={host} port={port} dbname=app server_lifetime=600 query_timeout=30
[users]
md5user = pool_size=3 reserve_pool_size=1 query_timeout=1min idle_transaction_timeout=10 client_idle_timeout=5min transaction_timeout=30
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
auth_type = md5
auth_file = {auth_file}
admin_users = md5user
transaction_timeout = 120
query_wait_notify = 3
server_check_delay = 10
dns_max_ttl = 30
"""


async def test_a_pgbouncer_125_ini_loads_and_reloads(pg: TempPostgres, tmp_path: Path) -> None:
    settings = pooler_settings(pg, tmp_path)
    path = tmp_path / "pgbouncer.ini"
    text = PGBOUNCER_125_INI.format(
        host=pg.host, port=pg.port, listen_port=settings["listen_port"], auth_file=settings["auth_file"]
    )
    path.write_text(text)
    config = load_config(path)
    user = config.users["md5user"]
    assert (user.query_timeout, user.idle_transaction_timeout, user.client_idle_timeout) == (60, 10, 300)
    assert user.reserve_pool_size == 1 and config.limits_for("app", "md5user").reserve_pool_size == 1
    assert config.databases["app"].server_lifetime == 600 and config.transaction_timeout == 120
    assert config.timeouts_for("app", "md5user").query_timeout == 60  # the user's, over the database's 30
    assert config.timeouts_for("app", "scramuser").query_timeout == 30
    pooler = Pooler(config, str(path))
    await pooler.start()
    try:
        admin = await admin_connect(pooler)
        await admin.execute("RELOAD")  # unimplemented keys are warned about, never a failed RELOAD
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="does not implement"):
            await admin.execute("SET dns_max_ttl = 10")
        await admin.close()
    finally:
        await pooler.stop()


# -- 9. the peer rule: user pgbouncer over the unix socket, from the same OS user ------------------


async def test_pgbouncer_user_over_the_unix_socket_is_admin_without_admin_users(
    start_pooler: StartPooler, tmp_path: Path
) -> None:
    pooler = await start_pooler(admin_users=[], unix_socket_dir=str(tmp_path))
    async with await psycopg.AsyncConnection.connect(
        host=str(tmp_path), port=pooler.config.listen_port, user="pgbouncer", dbname="pgbouncer", autocommit=True
    ) as admin:
        _, rows = await admin_rows(admin, "SHOW VERSION")
        assert "PgBouncer" in rows[0][0]
        await admin.execute("RECONNECT")  # an admin command, not only SHOW
    # Over TCP the same name is an ordinary user, with no password in auth_file.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=pooler.port, user="pgbouncer", password="x", dbname="pgbouncer"
        )


# -- 15. client limits per database and per user ----------------------------------------------------


async def test_max_db_and_user_client_connections(start_pooler: StartPooler) -> None:
    """PgBouncer 1.24's max_db_client_connections and max_user_client_connections, SET live too."""
    pooler = await start_pooler(
        **ADMIN_SETTINGS,
        max_db_client_connections=4,
        users={"scramuser": {"max_user_client_connections": 1, "reserve_pool_size": 2}},
    )
    admin = await admin_connect(pooler)
    conns = [await app_connect(pooler) for _ in range(2)]
    scram = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app"
    )
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError, match="max_user_client_connections"):
            await asyncpg.connect(
                host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app"
            )
        conns.append(await app_connect(pooler))
        with pytest.raises(asyncpg.TooManyConnectionsError, match="max_db_client_connections"):
            await app_connect(pooler)  # the database has its four clients
        await admin.execute("SET max_db_client_connections = 5")
        conns.append(await app_connect(pooler))
        _, databases = await admin_rows(admin, "SHOW DATABASES")
        assert {row[0]: (row[13], row[14]) for row in databases}["app"] == (5, 5)
        _, users = await admin_rows(admin, "SHOW USERS")
        scram_row = {row[0]: row for row in users}["scramuser"]
        assert scram_row[2].strip() == "2"  # [users] reserve_pool_size, shown
        assert (scram_row[6], scram_row[7]) == (1, 1)
        await scram.close()
        scram = await asyncpg.connect(  # a slot freed: the user gets in again
            host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app"
        )
    finally:
        await admin.close()
        for conn in [*conns, scram]:
            conn.terminate()


# -- 12 and 13. admin details and the rest of PgBouncer's commands ----------------------------------


async def test_admin_details_as_pgbouncer(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS, pool_mode="session")
    admin = await admin_connect(pooler)
    first = await app_connect(pooler)
    second = await app_connect(pooler)
    try:
        with pytest.raises(psycopg.errors.ProtocolViolation, match="no such database"):
            await admin.execute("KILL nosuchdb")
        # SHOW CLIENTS' id: a sequence number, as PgBouncer's.
        _, clients = await admin_rows(admin, "SHOW CLIENTS")
        ids = sorted(row[-1] for row in clients)
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids
        # xact_count counts SQL transactions, also in session mode (one server assignment here).
        async with first.transaction():
            await first.execute("SELECT 1")
        for _ in range(3):
            await first.execute("SELECT 1")
        stats = pooler.pools[("app", "md5user")].stats
        assert stats.xact_count == 4
        assert stats.server_assignment_count == 0  # the session still holds its server
        # Parse/bind counters: tracked named statements only (session mode tracks none).
        await first.fetchval("SELECT $1::int", 1)
        assert (stats.client_parse_count, stats.bind_count) == (0, 0)
    finally:
        await admin.close()
        first.terminate()
        second.terminate()


async def test_version_option() -> None:
    code, out, _ = await run_cmd(sys.executable, "-m", "pgfleet.pooler", "--version")
    assert code == 0 and out.startswith("pgfleet-pooler ")


async def test_pgbouncers_other_admin_commands(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    admin = await admin_connect(pooler)
    victim = await app_connect(pooler)
    try:
        await victim.execute("SELECT 1")
        # KILL_CLIENT <id>: that client, and only it, is closed.
        _, clients = await admin_rows(admin, "SHOW CLIENTS")
        [victim_id] = [row[-1] for row in clients if row[2] == "app"]
        await admin.execute(f"KILL_CLIENT {victim_id}")
        await wait_until(victim.is_closed)
        with pytest.raises(psycopg.errors.ProtocolViolation, match="not found"):
            await admin.execute(f"KILL_CLIENT {victim_id}")
        # DISABLE refuses new clients of a database; ENABLE lets them in again.
        await admin.execute("DISABLE app")
        with pytest.raises(asyncpg.ProtocolViolationError, match="does not allow connections"):
            await app_connect(pooler)
        _, databases = await admin_rows(admin, "SHOW DATABASES")
        assert {row[0]: row[16] for row in databases}["app"] == 1
        await admin.execute("ENABLE app")
        again = await app_connect(pooler)
        assert await again.fetchval("SELECT 1") == 1
        # SHOW SOCKETS / ACTIVE_SOCKETS / MEM / DNS_HOSTS / DNS_ZONES answer with PgBouncer's columns.
        names, sockets = await admin_rows(admin, "SHOW SOCKETS")
        assert names[:3] == ["type", "user", "database"] and names[-1] == "send_avail"
        assert {row[0] for row in sockets} == {"C", "S"}
        names, _ = await admin_rows(admin, "SHOW ACTIVE_SOCKETS")
        assert names[-1] == "send_avail"
        names, mem = await admin_rows(admin, "SHOW MEM")
        assert names == ["name", "size", "used", "free", "memtotal"] and mem
        assert (await admin_rows(admin, "SHOW DNS_HOSTS")) == (["hostname", "ttl", "addrs"], [])
        assert (await admin_rows(admin, "SHOW DNS_ZONES")) == (["zonename", "serial", "count"], [])
        # SUSPEND (PgBouncer's online restart) says clearly that pgfleet has none.
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="online restart"):
            await admin.execute("SUSPEND")
        await again.close()
    finally:
        await admin.close()
        victim.terminate()


# -- 16. server_check_query / server_check_delay, server_fast_close, reserve pool under SET ----------


async def test_a_server_idle_past_server_check_delay_is_checked_before_use(start_pooler: StartPooler) -> None:
    """PgBouncer runs server_check_query on a server idle longer than server_check_delay; one
    that fails it is closed and the client gets another, never an error."""
    pooler = await start_pooler(
        auth_type="trust", default_pool_size=1, server_check_delay=0.3, server_check_query="SELECT 1/0"
    )
    conn = await trust_connect(pooler.port, "app")
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        assert await conn.fetchval("SELECT pg_backend_pid()") == first  # used again at once: not checked
        pool = pooler.pools[("app", "postgres")]
        idle = pool.idle[0]
        await wait_until(lambda: pooler.loop.time() - idle.last_used > 0.3)
        assert await conn.fetchval("SELECT pg_backend_pid()") != first  # failed its check: replaced
    finally:
        conn.terminate()


async def test_server_check_delay_keeps_a_healthy_server(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, server_check_delay=0.2)
    conn = await trust_connect(pooler.port, "app")
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        idle = pooler.pools[("app", "postgres")].idle[0]
        await wait_until(lambda: pooler.loop.time() - idle.last_used > 0.2)
        assert await conn.fetchval("SELECT pg_backend_pid()") == first  # the empty query passed
    finally:
        conn.terminate()


async def test_server_fast_close_ends_a_session_whose_server_must_close(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS, pool_mode="session", server_fast_close=True)
    admin = await admin_connect(pooler)
    idle_session = await app_connect(pooler)
    busy_session = await app_connect(pooler)
    try:
        await idle_session.execute("SELECT 1")
        tx = busy_session.transaction()
        await tx.start()
        await admin.execute("RECONNECT")
        await wait_until(idle_session.is_closed)  # idle: ended now
        assert not busy_session.is_closed()
        assert await busy_session.fetchval("SELECT 2") == 2  # inside its transaction: carries on
        await tx.commit()  # the transaction ends well; the session ends with it
        await wait_until(lambda: not pooler.pools[("app", "md5user")].clients)
    finally:
        await admin.close()
        idle_session.terminate()
        busy_session.terminate()


async def test_reserve_pool_settings_change_with_set(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS, default_pool_size=1, query_wait_timeout=30)
    admin = await admin_connect(pooler)
    holder = await app_connect(pooler)
    waiter = await app_connect(pooler)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1")
        await admin.execute("SET reserve_pool_timeout = 0.1")
        await admin.execute("SET reserve_pool_size = 1")
        # The pool is full; past reserve_pool_timeout the queued client gets a reserve server.
        assert await asyncio.wait_for(waiter.fetchval("SELECT 7"), 10) == 7
        await tx.rollback()
    finally:
        await admin.close()
        holder.terminate()
        waiter.terminate()


async def test_client_idle_timeout_closes_the_client_with_08p01(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(client_idle_timeout=0.3)
    conn = await psycopg_app(pooler)
    await conn.execute("SELECT 1")
    await wait_until(lambda: not pooler.pools[("app", "md5user")].clients)
    error = await closed_with(conn, "SELECT 1")
    assert error.sqlstate == "08P01" and "client_idle_timeout" in str(error)


# -- 6. max_db_connections serves a database's pools fairly ---------------------------------------


async def test_max_db_connections_does_not_starve_a_new_users_pool(start_pooler: StartPooler) -> None:
    """A busy pool keeps its queue full; a new user's pool (whose login needs a server) still gets in."""
    pooler = await start_pooler(default_pool_size=2, max_db_connections=2, query_wait_timeout=60)
    busy = [await app_connect(pooler) for _ in range(6)]
    stop = asyncio.Event()

    async def hammer(conn: asyncpg.Connection) -> None:
        while not stop.is_set():
            await conn.execute("SELECT pg_sleep(0.02)")

    tasks = [asyncio.create_task(hammer(conn)) for conn in busy]
    try:
        await wait_until(lambda: len(pooler.pools[("app", "md5user")].waiting) >= 2)
        async with asyncio.timeout(10):  # without fairness: never (until client_login_timeout)
            newcomer = await asyncpg.connect(
                host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app"
            )
            assert await newcomer.fetchval("SELECT 1") == 1
            assert await newcomer.fetchval("SELECT 2") == 2
        await newcomer.close()
        assert all(not task.done() for task in tasks)  # the busy pool was served meanwhile too
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in busy:
            conn.terminate()
