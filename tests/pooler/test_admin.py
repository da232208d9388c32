"""The admin console: PgBouncer 1.25's SHOW columns, access control, bad commands."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from pgfleet.devtools.testing import client_env, run_cmd
from pgfleet.pooler.admin import parse_command
from pgfleet.pooler.pooler import Pooler

from .conftest import StartPooler

ADMIN_SETTINGS: dict[str, Any] = {"admin_users": ["md5user"], "stats_users": ["scramuser"]}

# PgBouncer 1.25's result columns, in order (src/admin.c and src/stats.c of that release).
PGBOUNCER_COLUMNS = {
    "POOLS": [
        "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
        "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
        "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts",
    ],
    "STATS": [
        "database", "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received",
        "total_sent", "total_xact_time", "total_query_time", "total_wait_time", "total_client_parse_count",
        "total_server_parse_count", "total_bind_count", "avg_server_assignment_count", "avg_xact_count",
        "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
        "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
    ],
    "STATS_TOTALS": [
        "database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
    ],
    "STATS_AVERAGES": [
        "database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
        "xact_time", "query_time", "wait_time", "avg_client_parse_count", "avg_server_parse_count",
        "avg_bind_count",
    ],
    "CLIENTS": [
        "type", "user", "database", "replication", "state", "addr", "port", "local_addr", "local_port",
        "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls",
        "application_name", "prepared_statements", "id",
    ],
    "DATABASES": [
        "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool_size",
        "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections", "current_connections",
        "max_client_connections", "current_client_connections", "paused", "disabled",
    ],
    "LISTS": ["list", "items"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "VERSION": ["version"],
    "USERS": [
        "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections", "current_connections",
        "max_user_client_connections", "current_client_connections",
    ],
}  # fmt: skip
PGBOUNCER_COLUMNS["SERVERS"] = PGBOUNCER_COLUMNS["CLIENTS"]


async def admin_connect(
    pooler: Pooler, user: str = "md5user", password: str = "md5pass"
) -> psycopg.AsyncConnection[Any]:
    # autocommit: no BEGIN; psycopg sends parameterless queries on the simple protocol.
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user=user, password=password, dbname="pgbouncer", autocommit=True
    )


async def admin_rows(conn: psycopg.AsyncConnection[Any], sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    cur = await conn.execute(sql)
    assert cur.description is not None
    return [col.name for col in cur.description], await cur.fetchall()


@pytest.mark.parametrize("command", sorted(PGBOUNCER_COLUMNS))
async def test_show_columns_match_pgbouncer(start_pooler: StartPooler, command: str) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    # Some traffic, so that pools, servers and clients have rows.
    app = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", dbname="app", autocommit=True
    )
    await app.execute("SELECT 1")
    async with await admin_connect(pooler) as conn:
        names, rows = await admin_rows(conn, f"SHOW {command};")
        assert names == PGBOUNCER_COLUMNS[command]
        assert rows, f"SHOW {command} returned no rows"
        assert all(len(row) == len(names) for row in rows)
    await app.close()


async def test_show_values_describe_the_pools(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    app = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", dbname="app", autocommit=True
    )
    for _ in range(3):
        await app.execute("SELECT 1")
    async with await admin_connect(pooler) as conn:
        names, rows = await admin_rows(conn, "SHOW POOLS")
        pools = {(row[0], row[1]): dict(zip(names, row, strict=True)) for row in rows}
        app_pool = pools[("app", "md5user")]
        assert app_pool["cl_active"] == 1 and app_pool["cl_waiting"] == 0
        assert app_pool["sv_idle"] == 1 and app_pool["sv_active"] == 0
        assert app_pool["pool_mode"] == "transaction"
        assert ("pgbouncer", "pgbouncer") in pools

        names, rows = await admin_rows(conn, "SHOW STATS")
        stats = {row[0]: dict(zip(names, row, strict=True)) for row in rows}
        assert stats["app"]["total_xact_count"] >= 3
        assert stats["app"]["total_query_count"] >= 3
        assert stats["app"]["total_received"] > 0 and stats["app"]["total_sent"] > 0

        names, rows = await admin_rows(conn, "SHOW DATABASES")
        dbs = {row[0]: dict(zip(names, row, strict=True)) for row in rows}
        assert dbs["app"]["pool_size"] == 5 and dbs["app"]["current_connections"] == 1
        assert dbs["app"]["paused"] == 0

        _, rows = await admin_rows(conn, "SHOW LISTS")
        lists = dict(rows)
        assert lists["pools"] >= 2 and lists["used_servers"] == 1

        _, rows = await admin_rows(conn, "SHOW CONFIG")
        config = {row[0]: row[1:] for row in rows}
        assert config["default_pool_size"] == ("5", "20", "yes")
        assert config["listen_port"][2] == "no"
        assert config["max_client_conn"][0] == "1000"

        _, rows = await admin_rows(conn, "SHOW SERVERS")
        assert [(row[0], row[2], row[4]) for row in rows] == [("S", "app", "idle")]
        assert rows[0][16] > 0  # remote_pid: the backend's pid

        _, rows = await admin_rows(conn, "show clients")
        states = sorted((row[2], row[4]) for row in rows)
        assert states == [("app", "idle"), ("pgbouncer", "active")]

        _, rows = await admin_rows(conn, "SHOW VERSION")
        assert rows[0][0].startswith("PgBouncer 1.25")
    await app.close()


async def test_show_help_and_bad_commands_keep_the_session(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    code, out, err = await run_cmd(
        "psql", "-X", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "md5user", "pgbouncer",
        "-c", "SHOW HELP", "-c", "FROBNICATE", "-c", "SHOW VERSION",
        env=client_env("md5pass"),
    )  # fmt: skip
    # psql goes on after a failed -c: the error in the middle left the session usable.
    assert code == 0, err
    assert "Console usage" in err and "SHOW STATS|STATS_TOTALS" in err
    assert "invalid command 'FROBNICATE', use SHOW HELP;" in err
    assert "PgBouncer 1.25" in out
    async with await admin_connect(pooler) as conn:
        for bad in ("SHOW NONSENSE", "FROBNICATE", "SET", "PAUSE a b", "SET x = ", "SHOW POOLS; SHOW STATS"):
            with pytest.raises(psycopg.errors.DatabaseError):
                await conn.execute(bad)
        _, rows = await admin_rows(conn, "SHOW VERSION")
        assert rows


async def test_pgbouncer_exporter_queries_succeed(start_pooler: StartPooler) -> None:
    """The queries pgbouncer_exporter runs (over lib/pq's simple protocol), with its column use."""
    pooler = await start_pooler(**ADMIN_SETTINGS)
    async with await admin_connect(pooler, "scramuser", "scrampass") as conn:
        names, _ = await admin_rows(conn, "SHOW STATS")
        assert names
        _, rows = await admin_rows(conn, "SHOW VERSION;")
        assert len(rows) == 1
        names, rows = await admin_rows(conn, "SHOW LISTS;")
        assert names == ["list", "items"] and all(isinstance(items, int) for _, items in rows)
        names, rows = await admin_rows(conn, "SHOW CONFIG;")
        config = {row[0]: row[1] for row in rows}
        for key in ("max_client_conn", "max_user_connections"):
            float(config[key])  # the exporter parses these as numbers
        for namespace, columns in {
            "DATABASES": {"name", "host", "port", "database", "force_user", "pool_size", "pool_mode",
                          "max_connections", "current_connections", "paused", "disabled"},
            "STATS_TOTALS": {"database", "query_count", "query_time", "bytes_received", "bytes_sent", "wait_time",
                             "xact_count", "xact_time", "client_parse_count", "server_parse_count", "bind_count"},
            "POOLS": {"database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                      "sv_tested", "sv_login", "maxwait"},
        }.items():  # fmt: skip
            names, _ = await admin_rows(conn, f"SHOW {namespace};")
            assert columns <= set(names)


async def test_access_control(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    # Nobody outside admin_users/stats_users gets in, whatever they authenticate as.
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        await admin_connect(pooler, "plainuser", "plainpass")
    # A wrong password is refused before the role check.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await admin_connect(pooler, "md5user", "wrong")
    # stats users: SHOW yes, anything that changes state no; the session survives.
    async with await admin_connect(pooler, "scramuser", "scrampass") as conn:
        await admin_rows(conn, "SHOW POOLS")
        for command in ("PAUSE", "RESUME", "RELOAD", "KILL app", "RECONNECT", "SHUTDOWN", "SET default_pool_size = 3"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admin access needed"):
                await conn.execute(command)
        await admin_rows(conn, "SHOW STATS")
    assert pooler.config.default_pool_size == 5
    assert not pooler.admin.paused_all
    # admins may.
    async with await admin_connect(pooler) as conn:
        await conn.execute("SET default_pool_size = 7")
    assert pooler.config.default_pool_size == 7


async def test_extended_protocol_gets_a_clear_error(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    conn = await admin_connect(pooler)
    with pytest.raises(psycopg.Error, match="extended query protocol not supported"):
        await conn.execute("SHOW POOLS WHERE %s", (1,))
    await conn.close()


def test_command_parser() -> None:
    assert parse_command("SHOW POOLS;") is not None
    command = parse_command("  show   pools ; ")
    assert command is not None and (command.verb, command.arg) == ("show", "pools")
    command = parse_command('PAUSE "App"')
    assert command is not None and (command.verb, command.arg) == ("pause", "App")
    command = parse_command("set server_reset_query TO 'DISCARD ''ALL'''")
    assert command is not None and (command.verb, command.arg, command.value) == (
        "set",
        "server_reset_query",
        "DISCARD 'ALL'",
    )
    command = parse_command("SET query_timeout=2.5")
    assert command is not None and command.value == "2.5"
    assert parse_command(";") is None
    for bad in ("SET a b", "SHOW a b c", "'x'", "SET = 1", "SHOW 'pools'"):
        with pytest.raises(Exception, match=r"invalid command|quoted"):
            parse_command(bad)


async def test_stats_averages_follow_the_stats_period(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(stats_period=0.2, **ADMIN_SETTINGS)
    app = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", dbname="app", autocommit=True
    )
    async with await admin_connect(pooler) as conn:
        averages: dict[str, Any] = {}

        async def refresh() -> None:
            nonlocal averages
            names, rows = await admin_rows(conn, "SHOW STATS_AVERAGES")
            averages = {row[0]: dict(zip(names, row, strict=True)) for row in rows}

        # Averages cover the last full stats_period: traffic shows up once a period has passed.
        for _ in range(100):
            await app.execute("SELECT 1")
            await refresh()
            if averages["app"]["xact_count"] > 0:
                break
        assert averages["app"]["xact_count"] > 0
        assert averages["app"]["query_count"] > 0
        # Microseconds per transaction; uvloop's clock ticks in milliseconds, so may read 0.
        assert averages["app"]["xact_time"] >= 0
    await app.close()


async def test_psql_runs_the_exporter_queries(start_pooler: StartPooler) -> None:
    """pgbouncer_exporter's statements, verbatim, through libpq's simple protocol."""
    pooler = await start_pooler(**ADMIN_SETTINGS)
    for sql in ("SHOW STATS", "SHOW VERSION;", "SHOW LISTS;", "SHOW CONFIG;", "SHOW DATABASES;",
                "SHOW STATS_TOTALS;", "SHOW POOLS;"):  # fmt: skip
        code, out, err = await run_cmd(
            "psql", "-X", "-A", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "scramuser", "pgbouncer", "-c", sql,
            env=client_env("scrampass"),
        )  # fmt: skip
        assert code == 0, (sql, err)
        assert "(1 row)" in out or "rows)" in out, (sql, out)
