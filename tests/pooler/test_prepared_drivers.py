"""Drivers that prepare named statements, many clients over a transaction pool of 5:
pgbench -M prepared, psycopg (prepare_threshold=0), node-postgres, pgjdbc."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import run_cmd

from .conftest import StartPooler

HERE = Path(__file__).parent
PGJDBC = Path("/usr/share/java/postgresql.jar")
HAVE_PGJDBC = PGJDBC.exists()
HAVE_NODE_PG = (HERE / "node" / "node_modules" / "pg").is_dir()


async def test_pgbench_prepared_mode(pg: TempPostgres, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=3)
    code, _, err = await run_cmd(
        "pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "app"
    )
    assert code == 0, err
    code, out, err = await run_cmd(
        # One thread per client: pgbench prepares with a blocking call, and a thread
        # whose other client holds the only free server inside BEGIN..END would wait forever.
        "pgbench", "-M", "prepared", "-c", "12", "-j", "12", "-t", "50", "-n",
        "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "postgres", "app",
        timeout=90,
    )  # fmt: skip
    assert code == 0, err + out
    assert "number of failed transactions: 0" in out
    assert "number of transactions actually processed: 600/600" in out
    stats = pooler.get_pool("app", "postgres").stats
    assert stats.prepared_hits > 600
    assert stats.server_parse_count < stats.client_parse_count + 3 * 7


async def test_psycopg_prepare_threshold_zero(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=5)

    async def client(i: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=pooler.port, user="postgres", dbname="app", prepare_threshold=0, autocommit=True
        ) as conn:
            conn.prepared_max = 8  # smaller than the statements used: psycopg deallocates too
            for round_ in range(4):
                for k in range(12):
                    cur = await conn.execute(f"SELECT %s::int + {k}", (i,))
                    assert await cur.fetchone() == (i + k,)
                async with conn.transaction():
                    cur = await conn.execute("SELECT %s::text", (f"t{round_}",))
                    assert await cur.fetchone() == (f"t{round_}",)

    await asyncio.gather(*(client(i) for i in range(30)))
    assert pooler.get_pool("app", "postgres").stats.prepared_hits > 0


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")
async def test_node_postgres_named_queries(start_pooler: StartPooler) -> None:
    assert HAVE_NODE_PG, "run scripts/ensure-deps.sh (installs npm pg)"
    pooler = await start_pooler(auth_type="trust", default_pool_size=5)
    code, out, err = await run_cmd("node", str(HERE / "node" / "named.js"), str(pooler.port), "40", "5", timeout=90)
    assert code == 0, err
    assert out.strip() == f"ok {40 * 5 * 10}"


@pytest.mark.skipif(shutil.which("java") is None, reason="java (JDK 11+) is not installed")
async def test_pgjdbc_past_prepare_threshold(start_pooler: StartPooler) -> None:
    assert HAVE_PGJDBC, "run scripts/ensure-deps.sh (installs libpostgresql-jdbc-java)"
    # pgjdbc sends extra_float_digits at startup; PgBouncer users list it the same way.
    pooler = await start_pooler(
        auth_type="trust", default_pool_size=5, ignore_startup_parameters=["extra_float_digits"]
    )
    code, out, err = await run_cmd(
        "java", "-cp", str(PGJDBC), str(HERE / "java" / "Named.java"), str(pooler.port), "20", "6", timeout=110
    )
    assert code == 0, err + out
    assert out.strip() == f"ok {20 * 6 * 5}"
    stats = pooler.get_pool("app", "postgres").stats
    assert stats.prepared_hits > 0
