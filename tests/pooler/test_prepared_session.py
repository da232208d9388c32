"""Session features in transaction mode: pinned until the state is gone, or refused."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import extended, frontend

from .conftest import StartPooler
from .rawpg import RawClient, kinds, rows


async def connect(pooler: Pooler) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")


def linked(pooler: Pooler) -> int:
    return len(pooler.get_pool("app", "postgres").active)


async def test_listen_pins_until_unlisten(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    listener, other = await connect(pooler), await connect(pooler)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("jobs", lambda *args: got.put_nowait(args[3]))
    assert linked(pooler) == 1  # the listener keeps its server
    for i in range(5):  # the other client shares the remaining one
        await other.execute("SELECT pg_notify('jobs', $1)", str(i))
    assert [await asyncio.wait_for(got.get(), 5) for _ in range(5)] == ["0", "1", "2", "3", "4"]
    await listener.execute("UNLISTEN *")
    await wait_until(lambda: linked(pooler) == 0)
    await listener.close()
    await other.close()


async def test_session_advisory_lock_pins_until_unlock_all(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=3)
    a, b = await connect(pooler), await connect(pooler)
    assert await a.fetchval("SELECT pg_advisory_lock(4242) IS NOT NULL")
    pid = await a.fetchval("SELECT pg_backend_pid()")
    for _ in range(5):
        assert await b.fetchval("SELECT pg_try_advisory_lock(4242)") is False
        assert await a.fetchval("SELECT pg_backend_pid()") == pid
    # b's attempts pin b as well: the proxy cannot tell a failed try from a taken lock.
    await a.execute("SELECT pg_advisory_unlock_all()")
    await wait_until(lambda: linked(pooler) == 1)
    assert await b.fetchval("SELECT pg_try_advisory_lock(4242)") is True
    await b.execute("SELECT pg_advisory_unlock_all()")
    await wait_until(lambda: linked(pooler) == 0)
    await a.close()
    await b.close()


async def test_set_outside_a_transaction_stays_with_its_client(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    a, b = await connect(pooler), await connect(pooler)
    await a.execute("SET work_mem = '7MB'")
    for _ in range(5):
        assert await b.fetchval("SHOW work_mem") == "4MB"
        assert await a.fetchval("SHOW work_mem") == "7MB"
    pool = pooler.get_pool("app", "postgres")
    server = next(iter(pool.active))
    await a.close()
    # The SET lives on that backend: it is closed, never handed to another client.
    await wait_until(lambda: server not in pool.active and server not in pool.idle)
    for _ in range(5):
        assert await b.fetchval("SHOW work_mem") == "4MB"
    await b.close()


@pytest.mark.parametrize(
    ("name", "settings"),
    [("", {}), ("s1", {"max_prepared_statements": 0})],
    ids=["unnamed", "named-passed-through"],
)
async def test_set_by_parse_stays_with_its_client(
    start_pooler: StartPooler, name: str, settings: dict[str, int]
) -> None:
    """A SET the proxy does not map (unnamed, or named with mapping off) pins like a simple one."""
    pooler = await start_pooler(auth_type="trust", default_pool_size=2, **settings)
    client = await RawClient.connect(pooler.port)
    # The ';' and the parameter-type count after the SQL must not hide the statement.
    client.send(
        extended.parse(name, "SET work_mem = '7MB';"), extended.bind("", name), extended.execute(), frontend.SYNC
    )
    assert kinds(await client.until_ready()) == "12CZ"
    assert linked(pooler) == 1
    other = await connect(pooler)
    for _ in range(3):
        assert await other.fetchval("SHOW work_mem") == "4MB"
    client.send(frontend.query("SHOW work_mem"))
    assert rows(await client.until_ready()) == [["7MB"]]
    await other.close()
    await client.close()


async def test_with_hold_cursor_and_temp_table_pin(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    a, b = await connect(pooler), await connect(pooler)
    async with a.transaction():
        await a.execute("DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
    await b.execute("SELECT 1")
    assert await a.fetchval("FETCH 3 FROM held") == 1
    assert await a.fetchval("FETCH 1 FROM held") == 4
    await a.execute("CLOSE ALL")
    await wait_until(lambda: linked(pooler) == 0)
    await a.execute("CREATE TEMP TABLE scratch (x int)")
    await b.execute("SELECT 1")
    await a.execute("INSERT INTO scratch VALUES (1)")
    assert await a.fetchval("SELECT count(*) FROM scratch") == 1
    assert await b.fetchval("SELECT to_regclass('pg_temp.scratch') IS NULL")
    await a.execute("DISCARD TEMP")
    await wait_until(lambda: linked(pooler) == 0)
    await a.close()
    await b.close()


async def test_sql_prepare_is_refused_with_a_clear_error(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", autocommit=True
    ) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="SQL PREPARE is not supported"):
            await conn.execute("PREPARE p AS SELECT 1")
        cur = await conn.execute("SELECT 'still here'")
        assert await cur.fetchone() == ("still here",)
        # Inside a transaction block the refusal aborts it, as any error would.
        async with conn.transaction():
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                await conn.execute("PREPARE p AS SELECT 1")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                await conn.execute("SELECT 1")
            raise psycopg.Rollback


async def test_copy_in_and_out_inside_transactions(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    conn = await connect(pooler)
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", prepare_threshold=0
    ) as pconn:
        await conn.execute("DROP TABLE IF EXISTS copied; CREATE TABLE copied (a int, b text)")
        async with conn.transaction():
            await conn.copy_records_to_table("copied", records=[(i, f"r{i}") for i in range(100)])
            assert await conn.fetchval("SELECT count(*) FROM copied") == 100
        async with pconn.transaction(), pconn.cursor() as cur:
            async with cur.copy("COPY copied (a, b) FROM STDIN") as copy:
                for i in range(100, 150):
                    await copy.write_row((i, f"r{i}"))
            await cur.execute("SELECT count(*) FROM copied WHERE a >= %s", (100,))
            assert await cur.fetchone() == (50,)
            out = []
            async with cur.copy("COPY (SELECT a FROM copied ORDER BY a) TO STDOUT") as copy:
                async for row in copy.rows():
                    out.append(int(row[0]))
            assert out == list(range(150))
        assert await conn.fetchval("SELECT count(*) FROM copied") == 150
    await conn.close()
