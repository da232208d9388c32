"""Pool modes, session parameters that follow the client, FIFO waiting, cancel."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.protocol import extended, frontend
from pgfleet.pooler.protocol.startup import build_cancel_request

from .conftest import StartPooler
from .rawpg import RawClient, kinds, rows


async def connect(port: int, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database="app", statement_cache_size=0, **kwargs
    )


async def test_transaction_mode_shares_one_server_between_idle_clients(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    a, b = await connect(pooler.port), await connect(pooler.port)
    try:
        pid_a = await a.fetchval("SELECT pg_backend_pid()")
        pid_b = await b.fetchval("SELECT pg_backend_pid()")
        assert pid_a == pid_b  # both clients went through the one server, one after the other
        async with a.transaction():
            await a.execute("SELECT 1")
            # b must wait for a's transaction: the server is a's until COMMIT.
            task = asyncio.create_task(b.fetchval("SELECT 42"))
            await asyncio.sleep(0)
            pool = pooler.pools[("app", "postgres")]
            await wait_until(lambda: len(pool.waiting) == 1)
            assert not task.done()
        assert await task == 42
    finally:
        await a.close()
        await b.close()


async def test_session_mode_keeps_the_server_and_resets_it(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, pool_mode="session")
    a = await connect(pooler.port)
    await a.execute("SET work_mem = '7MB'")
    await a.execute("CREATE TEMP TABLE session_scratch (x int)")
    pid = await a.fetchval("SELECT pg_backend_pid()")
    assert await a.fetchval("SHOW work_mem") == "7MB"
    waiter = asyncio.create_task(connect(pooler.port))
    b = await waiter
    blocked = asyncio.create_task(b.fetchval("SELECT pg_backend_pid()"))
    pool = pooler.pools[("app", "postgres")]
    await wait_until(lambda: len(pool.waiting) == 1)
    await a.close()
    # DISCARD ALL (server_reset_query) ran before b got the server.
    assert await blocked == pid
    assert await b.fetchval("SHOW work_mem") == "4MB"
    assert await b.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'session_scratch'") == 0
    await b.close()


async def test_session_reset_follows_the_rollback_of_an_unsynced_exchange(start_pooler: StartPooler) -> None:
    """A client leaves mid-pipeline inside BEGIN: Sync, ROLLBACK, then the reset; the link is kept."""
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, pool_mode="session")
    a = await RawClient.connect(pooler.port)
    a.send(frontend.query("SET work_mem = '7MB'"))
    await a.until_ready()
    a.send(frontend.query("SELECT pg_backend_pid()"))
    pid = rows(await a.until_ready())[0][0]
    a.send(extended.parse("", "BEGIN"), extended.bind("", ""), extended.execute(""), frontend.FLUSH)
    assert kinds([await a.message() for _ in range(3)]) == "12C"
    await a.close()
    b = await connect(pooler.port)
    assert str(await b.fetchval("SELECT pg_backend_pid()")) == pid  # reused, not closed
    assert await b.fetchval("SHOW work_mem") == "4MB"
    assert await b.fetchval("SELECT txid_current_if_assigned() IS NULL")
    await b.close()


async def test_reset_always_runs_after_a_client_left_inside_a_transaction(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(
        auth_type="trust",
        default_pool_size=1,
        server_reset_query="SELECT set_config('pgfleet.was_reset', 'yes', false)",
        server_reset_query_always=True,
    )
    a = await psycopg.AsyncConnection.connect(host="127.0.0.1", port=pooler.port, user="postgres", dbname="app")
    await a.execute("SELECT 1")  # psycopg opened a transaction
    await a.close()
    b = await connect(pooler.port)
    assert await b.fetchval("SELECT current_setting('pgfleet.was_reset', true)") == "yes"
    await b.close()


async def test_statement_mode_refuses_transaction_blocks_without_disconnecting(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", pool_mode="statement", default_pool_size=1)
    conn = await connect(pooler.port)
    try:
        assert await conn.fetchval("SELECT 5") == 5
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="statement pooling"):
            await conn.execute("BEGIN")
        # The refused block was rolled back; the client and the server carry on.
        assert await conn.fetchval("SELECT txid_current_if_assigned() IS NULL")
        assert await conn.fetchval("SELECT 6") == 6
    finally:
        await conn.close()


async def test_session_parameters_follow_the_client_across_servers(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", autocommit=True,
        application_name="alpha", prepare_threshold=None,
    ) as alpha, await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", autocommit=True, application_name="beta",
        prepare_threshold=None,
    ) as beta:  # fmt: skip
        await alpha.execute("SET TimeZone = 'Asia/Tokyo'")
        await alpha.execute("SET DateStyle = 'SQL, DMY'")
        await alpha.execute("SET IntervalStyle = 'iso_8601'")
        assert alpha.info.parameter_status("TimeZone") == "Asia/Tokyo"
        for _ in range(20):
            # Each statement may land on either server; the settings go with the client.
            cur = await alpha.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle'),"
                                      " current_setting('IntervalStyle'), current_setting('application_name')")  # fmt: skip
            assert await cur.fetchone() == ("Asia/Tokyo", "SQL, DMY", "iso_8601", "alpha")
            cur = await beta.execute("SELECT current_setting('TimeZone'), current_setting('application_name')")
            assert await cur.fetchone() == ("Etc/UTC", "beta")
    pool = pooler.pools[("app", "postgres")]
    assert pool.stats.xact_count >= 40


async def test_startup_parameters_not_tracked_are_applied_unless_ignored(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(
        auth_type="trust", default_pool_size=1, ignore_startup_parameters=["extra_float_digits"]
    )
    conn = await connect(pooler.port, server_settings={"extra_float_digits": "2", "search_path": "x, public"})
    assert await conn.fetchval("SHOW extra_float_digits") == "1"  # ignored
    assert await conn.fetchval("SHOW search_path") == "x, public"
    await conn.close()
    # PostgreSQL refuses the value: the client hears its error before anything of its own runs.
    conn = await connect(pooler.port, server_settings={"statement_timeout": "soon", "application_name": "bad"})
    refused = (asyncpg.InvalidParameterValueError, asyncpg.ConnectionDoesNotExistError)  # FATAL, then closed
    with pytest.raises(refused, match='invalid value for parameter "statement_timeout"'):
        await conn.execute("CREATE TABLE must_not_exist (x int)")
    await wait_until(conn.is_closed)
    conn = await connect(pooler.port)
    assert await conn.fetchval("SELECT to_regclass('must_not_exist') IS NULL")
    assert await conn.fetchval("SHOW search_path") == '"$user", public'
    await conn.close()
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter: replication"):
        await connect(pooler.port, server_settings={"replication": "database"})


async def test_a_reload_applies_to_a_startup_packet_seen_before(start_pooler: StartPooler) -> None:
    """A startup packet's reading is kept for the next client that sends the same bytes
    (a storm's clients all do); a reload that changes ignore_startup_parameters applies
    to the next login all the same."""
    pooler = await start_pooler(
        auth_type="trust", default_pool_size=1, ignore_startup_parameters=["extra_float_digits"]
    )
    for _ in range(2):
        conn = await connect(pooler.port, server_settings={"extra_float_digits": "2"})
        assert await conn.fetchval("SHOW extra_float_digits") == "1"  # ignored
        await conn.close()
    pooler.apply_config(pooler.config.model_copy(update={"ignore_startup_parameters": []}))
    conn = await connect(pooler.port, server_settings={"extra_float_digits": "2"})
    assert await conn.fetchval("SHOW extra_float_digits") == "2"
    await conn.close()


async def test_pipelined_extended_queries_keep_their_server(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    conn = await connect(pooler.port)
    try:
        # executemany pipelines Bind/Execute for every row before one Sync.
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS pipe (x int)")
        await conn.executemany("INSERT INTO pipe VALUES ($1)", [(i,) for i in range(500)])
        assert await conn.fetchval("SELECT count(*) FROM pipe") == 500
    finally:
        await conn.close()


async def test_clients_wait_in_fifo_order(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    holder = await connect(pooler.port)
    others = [await connect(pooler.port) for _ in range(5)]
    order: list[int] = []
    pool = pooler.pools[("app", "postgres")]
    try:
        tx = holder.transaction()
        await tx.start()

        async def run(i: int, conn: asyncpg.Connection) -> None:
            await conn.fetchval("SELECT $1::int", i)
            order.append(i)

        tasks = []
        for i, conn in enumerate(others):
            tasks.append(asyncio.create_task(run(i, conn)))
            await wait_until(lambda i=i: len(pool.waiting) == i + 1)
        await tx.commit()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
    finally:
        for conn in [holder, *others]:
            await conn.close()


async def test_cancel_reaches_the_server_running_the_query(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=2)
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", autocommit=True
    ) as conn:
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        pool = pooler.pools[("app", "postgres")]
        await wait_until(lambda: any(s.outstanding for s in pool.active))
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await query
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_cancel_with_a_wrong_key_is_ignored(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust")
    conn = await connect(pooler.port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
        from pgfleet.pooler.protocol.startup import build_cancel_request

        writer.write(build_cancel_request(12345, 678))
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, nothing cancelled
        writer.close()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_cancel_finds_its_client_in_either_pool_and_only_with_its_own_secret(
    start_pooler: StartPooler,
) -> None:
    # The pools' maps of clients are the map of cancel keys: a CancelRequest is looked up in
    # each pool, and a process id is matched only together with its own secret.
    pooler = await start_pooler(auth_type="trust")
    conns = [
        await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=pooler.port, user="postgres", dbname=db, autocommit=True
        )
        for db in ("postgres", "app")
    ]
    try:
        keys = [next(iter(pooler.pools[(db, "postgres")].clients.values())).cancel_key for db in ("postgres", "app")]
        for victim in (1, 0):  # the pool looked up last, then first
            queries = [asyncio.create_task(conn.execute("SELECT pg_sleep(30)")) for conn in conns]
            # Both queries are at their servers (each pool has one running).
            await wait_until(lambda: all(any(s.outstanding for s in pool.active) for pool in pooler.pools.values()))
            # One client's process id with the other's secret cancels nothing.
            for pid, secret in ((keys[0][0], keys[1][1]), (keys[1][0], keys[0][1])):
                reader, writer = await asyncio.open_connection("127.0.0.1", pooler.port)
                writer.write(build_cancel_request(pid, secret))
                async with asyncio.timeout(5):
                    assert await reader.read() == b""
                writer.close()
                await writer.wait_closed()
            await conns[victim].cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await queries[victim]
            other = queries[1 - victim]
            assert not other.done()  # the other pool's client still runs its query
            await conns[1 - victim].cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await other
    finally:
        for conn in conns:
            await conn.close()


async def test_a_queued_client_sending_much_is_paused_and_loses_nothing(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    holder = await connect(pooler.port)
    big = await connect(pooler.port)
    pool = pooler.pools[("app", "postgres")]
    try:
        tx = holder.transaction()
        await tx.start()
        value = "x" * 300_000  # well past what a queued client may buffer before being paused
        # One simple-protocol Query of 300 kB: it arrives while the client is queued.
        query = asyncio.create_task(big.execute(f"SELECT set_config('application_name', md5('{value}'), false)"))
        await wait_until(lambda: len(pool.waiting) == 1)
        client = pool.waiting[0]
        await wait_until(lambda: client._reading_paused)
        await tx.commit()
        await query
        expected = hashlib.md5(value.encode()).hexdigest()
        assert await big.fetchval("SELECT current_setting('application_name')") == expected
    finally:
        await holder.close()
        await big.close()
