"""Named prepared statements through a transaction pool: real drivers, few servers."""

from __future__ import annotations

import asyncio

import asyncpg
from pgfleet.devtools.tempdb import TempPostgres

from .conftest import StartPooler


async def test_asyncpg_default_statement_cache_over_a_small_pool(pg: TempPostgres, start_pooler: StartPooler) -> None:
    """100 tasks, a pool of 5, dozens of distinct statements: no error at all."""
    pooler = await start_pooler(default_pool_size=5, auth_type="trust")
    pool = pooler.get_pool("app", "postgres")
    errors: list[BaseException] = []

    async def client(i: int) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
        try:
            for round_ in range(3):
                for k in range(30):
                    sql = f"SELECT $1::int + {k}"
                    assert await conn.fetchval(sql, i) == i + k
                async with conn.transaction():
                    assert await conn.fetchval("SELECT $1::text || 'x'", str(round_)) == f"{round_}x"
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(100)))
    assert not errors
    stats = pool.stats
    assert stats.prepared_hits > stats.prepared_misses > 0
    assert stats.client_parse_count >= 100 * 31
    assert stats.server_parse_count < stats.client_parse_count
    assert stats.bind_count >= 100 * 3 * 31
