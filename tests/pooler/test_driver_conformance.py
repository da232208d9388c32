"""Drivers see PostgreSQL: the same behaviour directly, through session mode and through
transaction mode, except where docs/compatibility.md says otherwise.

Each test runs three ways (the `target` fixture): straight to PostgreSQL, through a
session-mode pooler and through a transaction-mode pooler, both with one server link so
that a second client lands on the backend the first one used.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import run_cmd
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import extended, frontend

from .conftest import StartPooler
from .rawpg import RawClient, error, kinds, rows

MODES = ["direct", "session", "transaction"]
NODE = Path(__file__).parent / "node"
HAVE_NODE_PG = (NODE / "node_modules" / "pg").is_dir()
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")


@dataclass
class Target:
    mode: str
    port: int
    pooler: Pooler | None

    async def connect(self, **kwargs: object) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="app", **kwargs
        )


@pytest.fixture(params=MODES)
async def target(request: pytest.FixtureRequest, pg: TempPostgres, start_pooler: StartPooler) -> Target:
    mode: str = request.param
    if mode == "direct":
        return Target(mode, pg.port, None)
    pooler = await start_pooler(auth_type="trust", pool_mode=mode, default_pool_size=1)
    return Target(mode, pooler.port, pooler)


# -- a client that leaves inside a transaction ---------------------------------------------------


async def test_close_inside_a_transaction_leaves_nothing_to_the_next_client(target: Target) -> None:
    """psycopg is not autocommit by default: closing inside a transaction is the usual case."""
    c1 = await target.connect()
    await c1.execute("set search_path = pg_catalog")
    await c1.execute("select pg_advisory_lock(42)")
    await c1.execute("listen leaked")
    await c1.execute("create temp table leaked (x int)")
    await c1.execute("declare leaked cursor with hold for select 1")
    await c1.commit()
    await c1.execute("select 1", prepare=True)  # Parse "_pg3_0"; a transaction is open
    await c1.close()

    c2 = await target.connect(autocommit=True)
    # Transaction mode lists its own shared statements (pgf_…): a documented difference.
    cur = await c2.execute(r"select name from pg_prepared_statements where name not like 'pgf\_%'")
    assert await cur.fetchall() == []
    cur = await c2.execute("show search_path")
    assert await cur.fetchone() == ('"$user", public',)
    cur = await c2.execute("select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()")
    assert await cur.fetchone() == (0,)
    cur = await c2.execute("select count(*) from pg_listening_channels()")
    assert await cur.fetchone() == (0,)
    cur = await c2.execute("select count(*) from pg_cursors")
    assert await cur.fetchone() == (0,)
    cur = await c2.execute("select count(*) from pg_class where relnamespace = pg_my_temp_schema()")
    assert await cur.fetchone() == (0,)
    cur = await c2.execute("select 1", prepare=True)  # "_pg3_0" again: no DuplicatePreparedStatement
    assert await cur.fetchone() == (1,)
    await c2.close()


# -- ParameterStatus ---------------------------------------------------------------------------------


async def test_parameter_status_reports_the_servers_spelling(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq sends PGDATESTYLE and PGCLIENTENCODING as startup parameters, spelled as given."""
    monkeypatch.setenv("PGDATESTYLE", "iso, dmy")
    monkeypatch.setenv("PGCLIENTENCODING", "utf-8")
    monkeypatch.setenv("PGTZ", "utc")
    conn = await target.connect(autocommit=True)
    try:
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.info.parameter_status("DateStyle") == "ISO, DMY"
        cur = await conn.execute("select '2024-03-04'::date, %s::text", ["é"])
        assert await cur.fetchone() == (datetime.date(2024, 3, 4), "é")
        # (the time zone is learnt from the server on the first transaction)
        assert conn.info.parameter_status("TimeZone") == "UTC"
        await conn.execute("set datestyle = 'sql, mdy'")
        assert conn.info.parameter_status("DateStyle") == "SQL, MDY"
        cur = await conn.execute("select '2024-03-04'::date")
        assert await cur.fetchone() == (datetime.date(2024, 3, 4),)
    finally:
        await conn.close()


# -- prepared statements across DDL ---------------------------------------------------------------------


async def test_prepared_statement_of_a_rolled_back_type(target: Target) -> None:
    """psycopg sends DEALLOCATE ALL after a rollback: its next Parse gets a fresh statement."""
    conn = await target.connect(prepare_threshold=0)
    try:
        for _ in range(3):
            await conn.execute("create type prepenum as enum ('foo', 'bar')")
            cur = await conn.execute("select %s::prepenum", ["foo"])
            assert await cur.fetchone() == ("foo",)
            await conn.rollback()
    finally:
        await conn.close()


async def test_prepared_statement_across_alter_table(target: Target) -> None:
    """psycopg sends DEALLOCATE ALL after DDL: the next execution is planned afresh, no 0A000."""
    conn = await target.connect(prepare_threshold=0, autocommit=True)
    try:
        await conn.execute("drop table if exists conform_alter")
        await conn.execute("create table conform_alter (a int)")
        await conn.execute("insert into conform_alter values (1)")
        cur = await conn.execute("select * from conform_alter where a = %s", [1])
        assert await cur.fetchall() == [(1,)]
        await conn.execute("alter table conform_alter add column b int default 2")
        cur = await conn.execute("select * from conform_alter where a = %s", [1])
        assert await cur.fetchall() == [(1, 2)]
        await conn.execute("drop table conform_alter")
    finally:
        await conn.close()


# -- pipelines ------------------------------------------------------------------------------------------


async def test_messages_after_a_pipeline_error_are_discarded_up_to_sync(target: Target) -> None:
    """libpq pipeline: the error arrives (Flush), the client sends more before its Sync."""
    P, B, E, S, H, Q = extended.parse, extended.bind, extended.execute, frontend.SYNC, frontend.FLUSH, frontend.query
    c = await RawClient.connect(target.port)
    try:
        c.send(Q("BEGIN"), Q("SAVEPOINT sp"), P("s1", "SELECT 1"), S, B("", "s1"), E(), S)
        assert kinds(await c.until_ready(4)) == "CZCZ1Z2DCZ"
        c.send(P("", "SELECT 1/0"), B("", ""), E(), H)
        assert kinds([await c.message() for _ in range(2)]) == "1E"  # 1/0 is folded when planned, at Bind
        c.send(P("", "SELECT 2"), B("", ""), E(), P("s2", "SELECT 2"), S)
        assert kinds(await c.until_ready()) == "Z"  # all of it discarded, as PostgreSQL does
        c.send(Q("ROLLBACK TO SAVEPOINT sp"), B("", "s1"), E(), S)
        reply = await c.until_ready(2)
        assert kinds(reply) == "CZ2DCZ"
        assert rows(reply) == [["1"]]
        c.send(B("", "s2"), E(), S)  # never prepared: its Parse was discarded
        assert error(await c.until_ready())["C"] == "26000"
        c.send(Q("ROLLBACK"), P("s2", "SELECT 2"), B("", "s2"), E(), S)
        assert rows(await c.until_ready(2)) == [["2"]]
    finally:
        await c.close()


# -- the end of a connection ----------------------------------------------------------------------------


async def until_closed(c: RawClient) -> list[tuple[str, bytes]]:
    out = []
    while True:
        try:
            out.append(await c.message())
        except ConnectionError:
            return out


async def test_backend_death_is_one_fatal_error(target: Target) -> None:
    """PostgreSQL's FATAL is the last word: nothing of the proxy's own follows it."""
    c = await RawClient.connect(target.port)
    try:
        c.send(frontend.query("SELECT pg_terminate_backend(pg_backend_pid())"))
        messages = await until_closed(c)
        assert kinds(messages)[-1:] == "E"  # after the row, or before it
        fields = error(messages)
        assert (fields["S"], fields["C"]) == ("FATAL", "57P01")
    finally:
        await c.close()


# -- node-postgres ------------------------------------------------------------------------------------


async def node_case(target: Target, case: str) -> dict[str, Any]:
    assert HAVE_NODE_PG, "run scripts/ensure-driver-deps.sh (installs npm pg)"
    code, out, err = await run_cmd("node", str(NODE / "conformance.js"), str(target.port), case, timeout=60)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@needs_node
async def test_node_postgres_quick_connect_and_end(target: Target) -> None:
    """end() right after connect(): Terminate comes before the startup packet; nothing comes back."""
    assert await node_case(target, "quick") == {"connect": "pending", "end": "ended", "errors": []}


@needs_node
async def test_node_postgres_backend_death_is_one_error(target: Target) -> None:
    # The driver's own error event for the closed connection, and no other.
    assert await node_case(target, "fatal") == {"query": "57P01", "errors": ["Connection terminated unexpectedly"]}


@needs_node
async def test_node_postgres_startup_settings(target: Target) -> None:
    settings = {
        "search_path": "pg_catalog,public",
        "work_mem": "7MB",
        "lock_timeout": "3s",
        "statement_timeout": "1234ms",
        "idle_timeout": "5678ms",
        "application_name": "conformance",
    }
    assert await node_case(target, "options") == {
        "first": settings,
        "again": settings,
        "timeout": "57014",
        "clean": {"search_path": '"$user", public', "work_mem": "4MB", "statement_timeout": "0"},
    }


async def test_terminate_before_startup_is_closed_without_a_word(target: Target) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    try:
        writer.write(frontend.TERMINATE)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        await writer.wait_closed()
