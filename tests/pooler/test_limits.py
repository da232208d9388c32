"""Limits that change while the pooler runs: never over the limit, never a cut transaction."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import yaml
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until

from .conftest import StartPooler, own_app


class Load:
    """N clients running short transactions until stopped; counts successes and failures."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.clients = clients
        self.ok = 0
        self.failed: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="app", statement_cache_size=0
        )
        try:
            while not self._stop.is_set():
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT pg_sleep(0.005)")
                        await conn.fetchval("SELECT 1")
                    self.ok += 1
                except Exception as exc:  # counted, and the test asserts there are none
                    self.failed.append(exc)
                    return
        finally:
            await conn.close()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def peak_backends(pg: TempPostgres, dbname: str, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    peak = 0
    while loop.time() < end:
        peak = max(peak, await asyncio.to_thread(pg.client_backends, None, dbname))
    return peak


async def test_lowering_the_pool_size_live(pg: TempPostgres, start_pooler: StartPooler, fresh_db: str) -> None:
    pooler = await start_pooler(
        auth_type="trust", default_pool_size=20, max_client_conn=500, databases=own_app(pg, fresh_db)
    )
    load = Load(pooler.port, 100)
    load.start()
    pool_key = ("app", "postgres")
    await wait_until(lambda: pool_key in pooler.pools and pooler.pools[pool_key].server_count >= 15, timeout=20)
    before = load.ok
    pooler.set_limits({"default_pool_size": 5})
    pool = pooler.pools[pool_key]
    await wait_until(lambda: pool.server_count <= 5, timeout=5)
    await wait_until(lambda: pg.client_backends(None, fresh_db) <= 5, timeout=5)
    assert await peak_backends(pg, fresh_db, 1.0) <= 5
    # ... and raising it again lets the pool grow back.
    pooler.set_limits({"databases": {"app": {"pool_size": 12}}})
    await wait_until(lambda: pool.server_count > 5, timeout=10)
    assert pool.server_count <= 12
    await load.stop()
    assert load.failed == []
    assert load.ok > before


async def test_invalid_limits_change_nothing(start_pooler: StartPooler) -> None:
    import pytest
    from pgfleet.pooler.config import ConfigError

    pooler = await start_pooler(auth_type="trust", default_pool_size=7)
    for bad in ({"default_pool_size": -1}, {"databases": {"nope": {"pool_size": 1}}}, {"no_such_setting": 1}):
        with pytest.raises(ConfigError):
            pooler.set_limits(bad)
    assert pooler.config.default_pool_size == 7


async def test_max_db_connections_caps_all_users_of_a_database(
    pg: TempPostgres, start_pooler: StartPooler, fresh_db: str
) -> None:
    pooler = await start_pooler(
        auth_type="md5", default_pool_size=10, max_db_connections=3, databases=own_app(pg, fresh_db)
    )
    conns = [
        await asyncpg.connect(
            host="127.0.0.1", port=pooler.port, user=user, password=pw, database="app", statement_cache_size=0
        )
        for user, pw in [("md5user", "md5pass"), ("scramuser", "scrampass")] * 5
    ]
    try:
        await asyncio.gather(*(c.execute("SELECT pg_sleep(0.05)") for c in conns))
        servers = sum(p.server_count for p in pooler.pools.values() if p.database == "app")
        assert servers <= 3, [
            (p.name, len(p.idle), [(s.state, s.client) for s in p.active], p.connecting) for p in pooler.pools.values()
        ]
        assert await asyncio.to_thread(pg.client_backends, None, fresh_db) <= 3
    finally:
        for c in conns:
            await c.close()


async def test_reserve_pool_opens_after_reserve_pool_timeout(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.2)
    holder = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database="app", statement_cache_size=0
    )
    other = await asyncpg.connect(
        host="127.0.0.1", port=pooler.port, user="postgres", database="app", statement_cache_size=0
    )
    try:
        tx = holder.transaction()
        await tx.start()
        # The one regular server is busy; after the timeout the reserve serves the waiter.
        assert await other.fetchval("SELECT pg_backend_pid()") != await holder.fetchval("SELECT pg_backend_pid()")
        await tx.rollback()
    finally:
        await holder.close()
        await other.close()


async def test_sighup_reloads_the_config_file(pg: TempPostgres, pooler_process: object, fresh_db: str) -> None:
    proc = pooler_process(auth_type="trust", default_pool_size=2, databases=own_app(pg, fresh_db))  # type: ignore[operator]

    async def burst() -> int:
        conns = [
            await asyncpg.connect(
                host="127.0.0.1", port=proc.port, user="postgres", database="app", statement_cache_size=0
            )
            for _ in range(8)
        ]
        try:
            sampler = asyncio.create_task(peak_backends(pg, fresh_db, 0.6))
            await asyncio.gather(*(c.execute("SELECT pg_sleep(0.4)") for c in conns))
            return await sampler
        finally:
            for c in conns:
                await c.close()

    assert await burst() <= 2
    settings = dict(proc.settings, default_pool_size=6)
    proc.config_path.write_text(yaml.safe_dump(settings))
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: "configuration reloaded" in proc.log(), timeout=10)
    peak = await burst()
    assert 2 < peak <= 6


async def test_sighup_with_a_broken_file_keeps_running(pooler_process: object) -> None:
    proc = pooler_process(auth_type="trust")  # type: ignore[operator]
    proc.config_path.write_text("default_pool_size: [not a number\n")
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: "reload failed" in proc.log(), timeout=10)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=proc.port, user="postgres", database="app", statement_cache_size=0
    )
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
