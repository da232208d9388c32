"""Large messages through pgfleet vs PostgreSQL direct, and what they cost everyone else.

One client sends a long simple Query (`SELECT length('xxx…')`, 100 MB by default) and a
long Bind (a 64 MB text parameter of a prepared statement); a second client meanwhile
runs `SELECT 1` in a loop. The table gives the long request's time, the second client's
latency while it runs (p50, p99, max) and the pooler's peak memory (VmHWM) growth.

    .venv/bin/python benchmarks/large.py [--query-mb 100] [--bind-mb 64] [--rounds 3]
        [--compiled build/compiled] [--out benchmarks/results/NAME.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from pgfleet.devtools.procs import PoolerProcess, free_port, start_pgfleet, transaction_pool_config
from pgfleet.devtools.tempdb import TempPostgres

DB = "postgres"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sample_latency(port: int, stop: asyncio.Event, first: asyncio.Event, out: list[float]) -> None:
    """`SELECT 1` in a loop on a connection of its own until `stop` is set (`first`: one is done)."""
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DB)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            await conn.fetchval("SELECT 1")
            out.append(time.perf_counter() - started)
            first.set()
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def one_case(port: int, request: Callable[[asyncpg.Connection], Awaitable[object]]) -> tuple[float, list[float]]:
    """Time one long request while another client samples its latency."""
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DB)
    stop, first = asyncio.Event(), asyncio.Event()
    latencies: list[float] = []
    sampler = asyncio.create_task(sample_latency(port, stop, first, latencies))
    try:
        await first.wait()  # the sampler is connected and served before the request starts
        started = time.perf_counter()
        await request(conn)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await sampler
        await conn.close()
    return elapsed, latencies


def requests(query_mb: int, bind_mb: int) -> dict[str, Callable[[asyncpg.Connection], Awaitable[object]]]:
    literal = "x" * (query_mb << 20)
    value = "y" * (bind_mb << 20)

    async def query(conn: asyncpg.Connection) -> object:
        return await conn.execute(f"SELECT length('{literal}')")  # simple Query protocol

    async def bind(conn: asyncpg.Connection) -> object:
        return await conn.fetchval("SELECT length($1::text)", value)  # Parse, Bind (named)

    return {f"{query_mb} MB Query": query, f"{bind_mb} MB Bind": bind}


async def run(args: argparse.Namespace) -> list[str]:
    rows: list[list[str]] = []
    with TempPostgres() as pg, tempfile.TemporaryDirectory() as work:
        env = dict(os.environ)
        if args.compiled:
            env["PYTHONPATH"] = args.compiled
        config = transaction_pool_config(pg.host, pg.port, DB, listen_port=free_port(), pool_size=4, max_clients=100)
        config["workers"] = 1
        workdir = Path(work) / "pgfleet"
        workdir.mkdir()
        pooler: PoolerProcess = start_pgfleet(config, workdir, env=env)
        pooler.wait_ready()
        try:
            targets = {"direct": pg.port, "pgfleet": int(config["listen_port"])}
            for name, request in requests(args.query_mb, args.bind_mb).items():
                times: dict[str, list[float]] = {target: [] for target in targets}
                lat: dict[str, list[float]] = {target: [] for target in targets}
                grown = 0.0
                for _ in range(args.rounds):
                    for target, port in targets.items():
                        before = peak_rss_mib(pooler.pid)
                        elapsed, latencies = await one_case(port, request)
                        times[target].append(elapsed)
                        lat[target].extend(latencies)
                        if target == "pgfleet":
                            grown = max(grown, peak_rss_mib(pooler.pid) - before)
                for target in targets:
                    t = statistics.median(times[target])
                    ms = [x * 1000 for x in lat[target]]
                    ratio = f"{t / statistics.median(times['direct']):.2f}x"
                    rows.append(
                        [
                            name,
                            target,
                            f"{t:.2f} s",
                            ratio,
                            f"{quantile(ms, 0.5):.1f}",
                            f"{quantile(ms, 0.99):.1f}",
                            f"{max(ms):.1f}",
                            str(len(ms)),
                            f"{grown:.0f} MiB" if target == "pgfleet" else "",
                        ]
                    )
        finally:
            pooler.stop()
    header = ["request", "target", "time (median)", "vs direct", "other p50 ms", "other p99 ms", "other max ms"]
    header += ["samples", "pooler peak RSS growth"]
    lines = [
        f"# Large messages, {dt.date.today().isoformat()}",
        "",
        f"`benchmarks/large.py --query-mb {args.query_mb} --bind-mb {args.bind_mb} --rounds {args.rounds}`"
        f"{' --compiled ' + args.compiled if args.compiled else ''}; {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. pgfleet: one process, transaction mode.",
        "'other': a second client's `SELECT 1` latency sampled while the long request runs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query-mb", type=int, default=100)
    parser.add_argument("--bind-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiled", default="", help="directory of the compiled build (make compiled)")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args()
    if args.compiled:
        args.compiled = str(Path(args.compiled).resolve())
    lines = asyncio.run(run(args))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
