"""Admin console commands that change the pooler: PAUSE/RESUME, KILL, RECONNECT, RELOAD, SET, SHUTDOWN."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.pooler import Pooler

from .conftest import StartPooler, pooler_settings
from .test_admin import ADMIN_SETTINGS, admin_connect, admin_rows


async def app_connect(pooler: Pooler, database: str = "app") -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="md5user", password="md5pass", database=database,
        statement_cache_size=0,
    )  # fmt: skip


async def not_done_within(task: asyncio.Task[Any], seconds: float) -> None:
    """Assert that `task` is still running after `seconds` (it must be waiting on something)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert not done, f"{task} finished too early: {task.result() if not task.exception() else task.exception()}"


async def test_pause_holds_new_transactions_and_resume_releases_them(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    busy = await app_connect(pooler)
    other = await app_connect(pooler)
    transaction = busy.transaction()
    await transaction.start()
    await busy.execute("SELECT 1")
    pool = pooler.pools[("app", "md5user")]
    admin = await admin_connect(pooler)

    # PAUSE waits for the server busy in a transaction to come back.
    pause = asyncio.create_task(admin.execute("PAUSE"))
    await wait_until(lambda: pool.paused)
    await not_done_within(pause, 0.3)
    # A new transaction queues instead of getting a server.
    held = asyncio.create_task(other.fetchval("SELECT 42"))
    await wait_until(lambda: len(pool.waiting) == 1)
    # The transaction in flight finishes normally; then PAUSE completes, with no server left.
    assert await busy.fetchval("SELECT 2") == 2
    await transaction.commit()
    await asyncio.wait_for(pause, 5)
    assert pool.server_count == 0
    _, rows = await admin_rows(admin, "SHOW DATABASES")
    assert {row[0]: row[15] for row in rows}["app"] == 1
    # Still held while paused; a second PAUSE is refused.
    await not_done_within(held, 0.2)
    with pytest.raises(psycopg.Error, match="already suspended/paused"):
        await admin.execute("PAUSE")
    await admin.execute("RESUME")
    assert await asyncio.wait_for(held, 5) == 42
    assert not pool.paused
    with pytest.raises(psycopg.Error, match="not paused"):
        await admin.execute("RESUME")
    await admin.close()
    await busy.close()
    await other.close()


async def test_pause_one_database_leaves_the_others(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    app = await app_connect(pooler)
    main = await app_connect(pooler, "postgres")
    await app.execute("SELECT 1")
    async with await admin_connect(pooler) as admin:
        await admin.execute("PAUSE app")
        held = asyncio.create_task(app.fetchval("SELECT 1"))
        assert await main.fetchval("SELECT 7") == 7  # postgres is not paused
        await not_done_within(held, 0.2)
        with pytest.raises(psycopg.Error, match="no such database"):
            await admin.execute("PAUSE nosuchdb")
        with pytest.raises(psycopg.Error, match="cannot pause admin db"):
            await admin.execute("PAUSE pgbouncer")
        with pytest.raises(psycopg.Error, match="database postgres is not paused"):
            await admin.execute("RESUME postgres")
        await admin.execute("RESUME app")
        assert await asyncio.wait_for(held, 5) == 1
    await app.close()
    await main.close()


async def test_kill_drops_the_database_connections_until_resume(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    victim = await app_connect(pooler)
    await victim.execute("SELECT 1")
    async with await admin_connect(pooler) as admin:
        await admin.execute("KILL app")
        await wait_until(victim.is_closed)
        assert pooler.pools[("app", "md5user")].server_count == 0
        # New clients of a killed database wait for RESUME.
        late = await app_connect(pooler)
        held = asyncio.create_task(late.fetchval("SELECT 3"))
        await not_done_within(held, 0.2)
        await admin.execute("RESUME app")
        assert await asyncio.wait_for(held, 5) == 3
    await late.close()


async def test_reconnect_and_wait_close(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    busy = await app_connect(pooler)
    transaction = busy.transaction()
    await transaction.start()
    old_pid = await busy.fetchval("SELECT pg_backend_pid()")
    admin = await admin_connect(pooler)
    await admin.execute("RECONNECT app")
    _, rows = await admin_rows(admin, "SHOW SERVERS")
    assert [row[13] for row in rows] == [1]  # close_needed
    wait_close = asyncio.create_task(admin.execute("WAIT_CLOSE app"))
    await not_done_within(wait_close, 0.2)
    # Nothing in flight is cut: the transaction carries on on the same backend.
    assert await busy.fetchval("SELECT pg_backend_pid()") == old_pid
    await transaction.commit()
    await asyncio.wait_for(wait_close, 5)
    assert await busy.fetchval("SELECT pg_backend_pid()") != old_pid
    await admin.close()
    await busy.close()


async def test_set_changes_behaviour(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    conns = [await app_connect(pooler) for _ in range(3)]
    async with await admin_connect(pooler) as admin:
        await admin.execute("SET default_pool_size = 1")
        await asyncio.gather(*(conn.execute("SELECT pg_sleep(0.05)") for conn in conns))
        pool = pooler.pools[("app", "md5user")]
        assert pool.pool_size == 1 and pool.server_count == 1
        await admin.execute("SET server_idle_timeout = '1500ms'")
        await admin.execute("SET log_connections TO 0")
        await admin.execute("SET admin_users = 'md5user,postgres'")
        assert pooler.config.server_idle_timeout == 1.5
        assert pooler.config.log_connections is False
        assert pooler.config.admin_users == ["md5user", "postgres"]
        _, rows = await admin_rows(admin, "SHOW CONFIG")
        assert {row[0]: row[1] for row in rows}["default_pool_size"] == "1"
        for bad, reason in (
            ("SET listen_port = 7000", "cannot change while running"),
            ("SET nosuch = 1", "unknown setting"),
            ("SET default_pool_size = many", "default_pool_size"),
            ("SET min_pool_size = 5", "min_pool_size must not exceed"),
        ):
            with pytest.raises(psycopg.Error, match=reason):
                await admin.execute(bad)
        assert pooler.config.listen_port != 7000 and pool.pool_size == 1
        # Parameters drivers set blindly are accepted and ignored, as in PgBouncer.
        await admin.execute("SET client_encoding = 'UTF8'")
    for conn in conns:
        await conn.close()


async def test_reload_reads_the_file_again(pg: TempPostgres, start_pooler: StartPooler, tmp_path: Path) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    path = tmp_path / "pooler.yaml"
    settings = pooler_settings(pg, tmp_path, **ADMIN_SETTINGS)
    settings["listen_port"] = pooler.config.listen_port
    pooler.config_path = str(path)
    conns = [await app_connect(pooler) for _ in range(4)]
    async with await admin_connect(pooler) as admin:
        settings["default_pool_size"] = 2
        path.write_text(yaml.safe_dump(settings))
        await admin.execute("RELOAD")
        assert pooler.config.default_pool_size == 2
        await asyncio.gather(*(conn.execute("SELECT pg_sleep(0.05)") for conn in conns))
        assert pooler.pools[("app", "md5user")].server_count <= 2
        path.write_text("default_pool_size: [not, a, number]\n")
        with pytest.raises(psycopg.Error, match="RELOAD failed"):
            await admin.execute("RELOAD")
        assert pooler.config.default_pool_size == 2  # the running config stays
        _, rows = await admin_rows(admin, "SHOW POOLS")  # and so does the session
        assert rows
    for conn in conns:
        await conn.close()


async def test_shutdown_wait_for_clients_drains(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    busy = await app_connect(pooler)
    transaction = busy.transaction()
    await transaction.start()
    admin = await admin_connect(pooler)
    await admin.execute("SHUTDOWN WAIT_FOR_CLIENTS")
    assert pooler.draining
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await app_connect(pooler)  # no new clients
    assert await busy.fetchval("SELECT 5") == 5
    await transaction.commit()
    await asyncio.wait_for(pooler.wait_stopped(), 5)
    await admin.close()


async def test_shutdown_wait_for_servers(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    busy = await app_connect(pooler)
    transaction = busy.transaction()
    await transaction.start()
    await busy.execute("SELECT 1")
    admin = await admin_connect(pooler)
    await admin.execute("SHUTDOWN WAIT_FOR_SERVERS")
    await not_done_within(asyncio.ensure_future(pooler.wait_stopped()), 0.2)
    await transaction.commit()  # the last server comes back: the pooler exits
    await asyncio.wait_for(pooler.wait_stopped(), 5)
    await admin.close()


async def test_shutdown_immediate(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**ADMIN_SETTINGS)
    admin = await admin_connect(pooler)
    with pytest.raises(psycopg.OperationalError):
        await admin.execute("SHUTDOWN")
    await asyncio.wait_for(pooler.wait_stopped(), 5)
    await admin.close()
