"""Exact message sequences through a transaction pool of one server: names, errors,
pipelines, Flush, DEALLOCATE/DISCARD, eviction, stale plans, statistics."""

from __future__ import annotations

import asyncio

import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.pooler.protocol import extended, frontend
from pgfleet.pooler.protocol.extended import STATEMENT

from .conftest import StartPooler
from .rawpg import RawClient, error, kinds, rows

P, B, D, E, C = extended.parse, extended.bind, extended.describe, extended.execute, extended.close
S, H, Q = frontend.SYNC, frontend.FLUSH, frontend.query


async def one_server(start_pooler: StartPooler, **settings: object) -> int:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, **settings)
    return pooler.port


def run(name: str) -> tuple[bytes, ...]:
    return (B("", name), E(), S)


async def test_same_name_in_two_clients_means_two_statements(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a, b = await RawClient.connect(port), await RawClient.connect(port)
    a.send(P("s", "SELECT 'a'"), S)
    assert kinds(await a.until_ready()) == "1Z"
    b.send(P("s", "SELECT 'b'"), S)
    assert kinds(await b.until_ready()) == "1Z"
    # The same query text in a third name: the server already has it, the client still
    # gets its ParseComplete in place.
    b.send(P("again", "SELECT 'a'"), B("", "again"), E(), S)
    reply = await b.until_ready()
    assert kinds(reply) == "12DCZ" and rows(reply) == [["a"]]
    a.send(*run("s"))
    assert rows(await a.until_ready()) == [["a"]]
    b.send(*run("s"))
    assert rows(await b.until_ready()) == [["b"]]
    await a.close()
    await b.close()


async def test_name_reuse_unknown_name_and_close_behave_like_postgres(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a, other = await RawClient.connect(port), await RawClient.connect(port)
    other.send(P("s", "SELECT 'other'"), S)
    await other.until_ready()
    a.send(P("s", "SELECT 1"), S)
    assert kinds(await a.until_ready()) == "1Z"
    a.send(P("s", "SELECT 2"), S)
    reply = await a.until_ready()
    assert kinds(reply) == "EZ"
    assert error(reply)["C"] == "42P05" and error(reply)["M"] == 'prepared statement "s" already exists'
    a.send(*run("nope"))
    reply = await a.until_ready()
    assert error(reply)["C"] == "26000" and error(reply)["M"] == 'prepared statement "nope" does not exist'
    a.send(C(STATEMENT, "s"), S)
    assert kinds(await a.until_ready()) == "3Z"
    a.send(C(STATEMENT, "never-there"), S)  # PostgreSQL: not an error
    assert kinds(await a.until_ready()) == "3Z"
    a.send(*run("s"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(P("s", "SELECT 3"), *run("s"))
    assert rows(await a.until_ready()) == [["3"]]
    other.send(*run("s"))  # never touched by a's names
    assert rows(await other.until_ready()) == [["other"]]
    await a.close()
    await other.close()


async def test_error_mid_pipeline_skips_to_sync(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    warm = await RawClient.connect(port)
    warm.send(P("w", "SELECT 'c'"), S)  # the server has 'c' already: a's Parse of it is a hit
    await warm.until_ready()
    a.send(
        P("a", "SELECT 'a'"), B("", "a"), E(),
        P("bad", "SELEKT"), B("", "bad"), E(),
        P("c", "SELECT 'c'"), B("", "c"), E(),
        S,
    )  # fmt: skip
    reply = await a.until_ready()
    assert kinds(reply) == "12DCEZ"
    assert error(reply)["C"] == "42601"
    # 'bad' and 'c' were skipped by the error, so they do not exist; 'a' does.
    a.send(*run("c"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(*run("bad"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(*run("a"))
    assert rows(await a.until_ready()) == [["a"]]
    # Many statements, one Sync.
    msgs = []
    for i in range(20):
        msgs += [P(f"p{i}", f"SELECT {i}"), B("", f"p{i}"), E()]
    a.send(*msgs, S)
    reply = await a.until_ready()
    assert kinds(reply) == "12DC" * 20 + "Z"
    assert rows(reply) == [[str(i)] for i in range(20)]
    await a.close()
    await warm.close()


async def test_flush_without_sync_and_describe(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    a.send(P("f", "SELECT $1::int * 2", [23]), D(STATEMENT, "f"), H)
    got = [await a.message() for _ in range(3)]
    assert [k for k, _ in got] == ["1", "t", "T"]
    a.send(B("", "f", b"\x00\x00\x00\x01\x00\x00\x00\x0221\x00\x00"), E(), H)
    got = [await a.message() for _ in range(3)]
    assert [k for k, _ in got] == ["2", "D", "C"]
    a.send(S)
    assert kinds(await a.until_ready()) == "Z"
    await a.close()


@pytest.mark.parametrize(
    ("query", "answer"),
    [("SELECT 2", "TDCZ"), ("PREPARE x AS SELECT 1", "EZ"), ("SET application_name = 'piped'", "CZ")],
)
async def test_simple_query_between_syncs_keeps_its_place(start_pooler: StartPooler, query: str, answer: str) -> None:
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    a.send(Q("SELECT pg_backend_pid()"))
    pid = rows(await a.until_ready())
    # One write: a named Parse+Sync, a simple Query (not flagged, refused, or flagged with
    # nothing to do), then a Parse+Sync of the same text (a hit: the proxy's Parse+Close).
    a.send(P("s1", "SELECT 1"), S, Q(query), P("s2", "SELECT 1"), S)
    assert kinds(await a.until_ready()) == "1Z"
    assert kinds(await a.until_ready()) == answer
    assert kinds(await a.until_ready()) == "1Z"
    a.send(*run("s1"), *run("s2"), Q("SELECT pg_backend_pid()"))
    replies = await a.until_ready(3)
    assert kinds(replies) == "2DCZ2DCZTDCZ"
    assert rows(replies) == [["1"], ["1"], *pid]  # and the same server: the link was kept
    await a.close()


async def test_deallocate_and_discard_all_for_that_client_only(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a, other = await RawClient.connect(port), await RawClient.connect(port)
    other.send(P("x", "SELECT 'kept'"), S)
    await other.until_ready()
    a.send(P("x", "SELECT 'kept'"), P("y", "SELECT 'y'"), S)
    await a.until_ready()
    a.send(Q("DEALLOCATE x"))
    reply = await a.until_ready()
    assert kinds(reply) == "CZ" and reply[0][1] == b"DEALLOCATE\x00"
    a.send(*run("x"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(Q("deallocate prepare x"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(Q("DEALLOCATE ALL"))
    assert kinds(await a.until_ready()) == "CZ"
    a.send(*run("y"))
    assert error(await a.until_ready())["C"] == "26000"
    a.send(P("z", "SELECT 'z'"), S)
    await a.until_ready()
    a.send(Q("DISCARD ALL"))
    assert kinds(await a.until_ready()) == "CZ"
    a.send(*run("z"))
    assert error(await a.until_ready())["C"] == "26000"
    # DISCARD ALL inside a transaction block fails as in PostgreSQL; the names stay.
    a.send(P("z", "SELECT 'z'"), S)
    await a.until_ready()
    a.send(Q("BEGIN"))
    await a.until_ready()
    a.send(Q("DISCARD ALL"))
    assert error(await a.until_ready())["C"] == "25001"
    a.send(Q("ROLLBACK"))
    await a.until_ready()
    a.send(*run("z"))
    assert rows(await a.until_ready()) == [["z"]]
    other.send(*run("x"))  # the server dropped its copies; the proxy prepares x again
    assert rows(await other.until_ready()) == [["kept"]]
    await a.close()
    await other.close()


async def test_lru_keeps_at_most_max_prepared_statements(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler, max_prepared_statements=3)
    a = await RawClient.connect(port)
    for round_ in range(3):
        for i in range(8):
            a.send(P(f"s{i}", f"SELECT {i}") if round_ == 0 else b"", *run(f"s{i}"))
            assert rows(await a.until_ready()) == [[str(i)]]
    a.send(Q("SELECT count(*) FROM pg_prepared_statements"))
    assert rows(await a.until_ready()) == [["3"]]
    await a.close()


async def test_stale_plan_after_ddl_is_reprepared(pg: TempPostgres, start_pooler: StartPooler) -> None:
    await asyncio.to_thread(
        pg.sql, "DROP TABLE IF EXISTS ddl_t; CREATE TABLE ddl_t (a int); INSERT INTO ddl_t VALUES (1)", "app"
    )
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    a.send(P("s", "SELECT * FROM ddl_t"), *run("s"))
    assert rows(await a.until_ready()) == [["1"]]
    await asyncio.to_thread(pg.sql, "ALTER TABLE ddl_t ADD COLUMN b int DEFAULT 2", "app")
    a.send(*run("s"))
    reply = await a.until_ready()
    assert error(reply)["C"] == "0A000" and "cached plan" in error(reply)["M"]
    a.send(*run("s"))
    assert rows(await a.until_ready()) == [["1", "2"]]
    await a.close()


async def test_statement_of_a_dropped_type_is_reprepared(pg: TempPostgres, start_pooler: StartPooler) -> None:
    """PostgreSQL never looks at a statement's parameter types again: the proxy renews it."""
    enum = "DROP TYPE IF EXISTS stale_enum; CREATE TYPE stale_enum AS ENUM ('x')"
    await asyncio.to_thread(pg.sql, enum, "app")
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    x = b"\x00\x00\x00\x01\x00\x00\x00\x01x\x00\x00"  # one text parameter: 'x'
    a.send(P("s", "SELECT $1::stale_enum::text"), B("", "s", x), E(), S)
    assert rows(await a.until_ready()) == [["x"]]
    await asyncio.to_thread(pg.sql, enum, "app")
    a.send(B("", "s", x), E(), S)
    reply = await a.until_ready()
    assert error(reply)["C"] == "XX000" and "cache lookup failed for type" in error(reply)["M"]
    a.send(B("", "s", x), E(), S)
    assert rows(await a.until_ready()) == [["x"]]
    b = await RawClient.connect(port)  # another client of that text gets the renewed statement
    b.send(P("t", "SELECT $1::stale_enum::text"), B("", "t", x), E(), S)
    assert rows(await b.until_ready()) == [["x"]]
    await a.close()
    await b.close()


async def test_client_leaving_after_a_pipeline_error_hands_on_a_sound_link(start_pooler: StartPooler) -> None:
    port = await one_server(start_pooler)
    a = await RawClient.connect(port)
    a.send(Q("SELECT pg_backend_pid()"))
    pid = rows(await a.until_ready())
    a.send(P("", "SELECT 1/0"), B("", ""), E(), H)
    assert kinds([await a.message() for _ in range(2)]) == "1E"
    await a.close()  # the proxy ends that exchange with a Sync of its own
    b = await RawClient.connect(port)
    b.send(P("x", "SELECT 5"), *run("x"), Q("SELECT pg_backend_pid()"))
    reply = await b.until_ready(2)
    assert kinds(reply) == "12DCZTDCZ"
    assert rows(reply) == [["5"], *pid]  # the same link, its bookkeeping intact
    await b.close()


async def test_statistics_count_parses_binds_hits_and_misses(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    a, b = await RawClient.connect(pooler.port), await RawClient.connect(pooler.port)
    a.send(P("s", "SELECT 1"), *run("s"))
    await a.until_ready()
    b.send(P("t", "SELECT 1"), *run("t"))
    await b.until_ready()
    b.send(P("", "SELECT 2"), *run(""))
    await b.until_ready()
    stats = pooler.get_pool("app", "postgres").stats
    # PgBouncer counts tracked named statements only: not the unnamed one.
    assert stats.client_parse_count == 2
    assert stats.server_parse_count == 1  # a's statement once (b's is a hit)
    assert stats.bind_count == 2
    assert (stats.prepared_misses, stats.prepared_hits) == (1, 3)  # a's Parse; a's Bind, b's Parse and Bind
    await a.close()
    await b.close()
