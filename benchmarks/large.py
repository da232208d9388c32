"""Large messages through pgfleet vs PostgreSQL direct, and what they cost everyone else.

One client sends a long simple Query (`SELECT length('xxx…')`, 100 MB by default), a long
Bind (a 64 MB text parameter of a prepared statement) and asks for a long result (a
100 MB DataRow); a second client meanwhile runs `SELECT 1` in a loop on a connection of
its own. The table gives the long request's time, the second client's latency while it
runs (p50, p99, max) and the pooler's peak memory (VmHWM) growth.

Targets take turns in each round, so that the machine's drift hits all of them alike:
`direct` (both clients straight to PostgreSQL); `pgfleet` (both through one pooler
process from the sources) and, with --compiled, `pgfleet compiled` (the image's build);
and `hop only`: the long request straight to PostgreSQL while the second client goes
through the pooler, which then streams nothing. The second client's latency through
the pooler is read against `hop only`, which carries the same extra hop: what the
streaming costs others is the difference, what the hop costs on this machine is `hop
only` against `direct`. With --pgbouncer, PgBouncer (transaction mode, its defaults)
runs beside: `pgbouncer`, and `hop only pgbouncer` (the second client through PgBouncer).

For each pooler the table also gives, per long request, the CPU time of its process and
the time its process spent runnable but waiting for a core (the run-queue wait of
/proc/PID/schedstat): a pooler that has work while every core is busy makes the second
client wait although its own loop is free.

    .venv/bin/python benchmarks/large.py [--query-mb 100] [--bind-mb 64] [--result-mb 100]
        [--rounds 3] [--compiled build/compiled] [--also NAME=PYTHONPATH]... [--pgbouncer] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from pgfleet.devtools.procs import (
    PoolerProcess,
    free_port,
    pgbouncer_path,
    start_pgbouncer,
    start_pgfleet,
    transaction_pool_config,
)
from pgfleet.devtools.tempdb import TempPostgres

DB = "postgres"
Request = Callable[[asyncpg.Connection], Awaitable[object]]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sample_latency(port: int) -> None:
    """The second client (a process of its own, `--sample PORT`): `SELECT 1` in a loop.

    It says "ready" once served, samples until its stdin closes, then prints the
    latencies (seconds, one a line). A process of its own, because the long request's
    client spends whole milliseconds of its loop (and the GIL) building and sending
    100 MB: sampled there, that would count as the pooler's delay.
    """
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DB)
    out: list[float] = []
    try:
        while not stop.done():
            started = time.perf_counter()
            await conn.execute("SELECT 1")  # simple Query: PgBouncer 1.18 maps no named statement
            out.append(time.perf_counter() - started)
            if len(out) == 1:
                print("ready", flush=True)
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    print("\n".join(f"{x:.6f}" for x in out[1:]), flush=True)  # the first was before the request


async def one_case(
    port: int, request: Request, other_port: int | None = None, *, named: bool = True
) -> tuple[float, list[float]]:
    """Time one long request while another client (another process) samples its latency.

    `named`: asyncpg prepares named statements (PgBouncer 1.18 in transaction mode cannot
    carry them: there the Bind goes to the unnamed statement).
    """
    cache = {} if named else {"statement_cache_size": 0}
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database=DB, **cache)
    argv = [sys.executable, "-P", __file__, "--sample", str(other_port or port)]
    pipe = asyncio.subprocess.PIPE
    sampler = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe)
    assert sampler.stdin is not None and sampler.stdout is not None
    try:
        if await sampler.stdout.readline() != b"ready\n":
            raise RuntimeError("the sampling client did not start")
        started = time.perf_counter()
        await request(conn)
        elapsed = time.perf_counter() - started
    finally:
        sampler.stdin.close()
        output, _ = await sampler.communicate()
        await conn.close()
    return elapsed, [float(line) for line in output.split()]


def requests(query_mb: int, bind_mb: int, result_mb: int = 0) -> dict[str, Request]:
    literal = "x" * (query_mb << 20)
    value = "y" * (bind_mb << 20)

    async def query(conn: asyncpg.Connection) -> object:
        return await conn.execute(f"SELECT length('{literal}')")  # simple Query protocol

    async def bind(conn: asyncpg.Connection) -> object:
        return await conn.fetchval("SELECT length($1::text)", value)  # Parse, Bind (named)

    async def result(conn: asyncpg.Connection) -> object:
        return await conn.fetchval(f"SELECT repeat('z', {result_mb << 20})")

    out: dict[str, Request] = {f"{query_mb} MB Query": query, f"{bind_mb} MB Bind": bind}
    if result_mb:
        out[f"{result_mb} MB result"] = result
    return out


@dataclass
class Runs:
    """One request against one target, over the rounds."""

    times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # every sample of every round
    p99s: list[float] = field(default_factory=list)  # per round
    grown: float = 0.0
    cpu: list[float] = field(default_factory=list)  # the pooler's CPU seconds, per request
    waited: list[float] = field(default_factory=list)  # its seconds runnable without a core


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the one running the loop) has spent on a core,
    and runnable but waiting for one."""
    fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def renice(pid: int, nice: int) -> None:
    """Give the pooler's loop thread (the main one; PgBouncer's only one) this niceness, and
    the session it was started in: under autogroup scheduling a session shares the cores
    with the other sessions as one, at the autogroup's niceness."""
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        autogroup.write_text(str(nice))


async def run(args: argparse.Namespace) -> list[str]:
    builds = {"pgfleet": ""} | ({"pgfleet compiled": args.compiled} if args.compiled else {})
    builds |= dict(also.split("=", 1) for also in args.also)
    results: dict[tuple[str, str], Runs] = {}
    with TempPostgres() as pg, tempfile.TemporaryDirectory() as work:
        poolers: dict[str, tuple[PoolerProcess, int]] = {}
        try:
            if not args.pure:
                del builds["pgfleet"]
            twins = {f"{name} nice {args.nice}": path for name, path in builds.items() if args.nice is not None}
            for name, pythonpath in (builds | twins).items():
                env = dict(os.environ)
                if pythonpath:
                    env["PYTHONPATH"] = pythonpath
                config = transaction_pool_config(
                    pg.host, pg.port, DB, listen_port=free_port(), pool_size=4, max_clients=100
                )
                config["workers"] = 1
                workdir = Path(work) / name.replace(" ", "-")
                workdir.mkdir()
                pooler = start_pgfleet(config, workdir, env=env)
                pooler.wait_ready()
                poolers[name] = (pooler, int(config["listen_port"]))
            for name in ["pgbouncer"] + ([f"pgbouncer nice {args.nice}"] if args.nice is not None else []):
                if not args.pgbouncer:
                    break
                config = transaction_pool_config(
                    pg.host, pg.port, DB, listen_port=free_port(), pool_size=4, max_clients=100
                )
                os.chmod(work, 0o755)  # PgBouncer runs as `postgres` when started as root
                workdir = Path(work) / name.replace(" ", "-")
                workdir.mkdir()
                bouncer = start_pgbouncer(config, workdir)
                bouncer.wait_ready()
                poolers[name] = (bouncer, int(config["listen_port"]))
            for name, (pooler, _) in poolers.items():
                if " nice " in name:
                    renice(pooler.pid, args.nice)
            first_port = next(iter(poolers.values()))[1]
            # target -> (the long request's port, the second client's port, the pooler streaming it)
            targets: dict[str, tuple[int, int, PoolerProcess | None]] = {"direct": (pg.port, pg.port, None)}
            targets["hop only"] = (pg.port, first_port, None)
            targets |= {name: (port, port, pooler) for name, (pooler, port) in poolers.items()}
            if args.pgbouncer:  # after the pgfleet builds, beside PgBouncer's own
                targets["hop only pgbouncer"] = (pg.port, poolers["pgbouncer"][1], None)
            for name, request in requests(args.query_mb, args.bind_mb, args.result_mb).items():
                for _ in range(args.rounds):
                    for target, (port, other_port, pooler) in targets.items():
                        runs = results.setdefault((name, target), Runs())
                        before = peak_rss_mib(pooler.pid) if pooler else 0.0
                        cpu, waited = schedstat(pooler.pid) if pooler else (0.0, 0.0)
                        named = not target.startswith("pgbouncer")
                        elapsed, latencies = await one_case(port, request, other_port, named=named)
                        if pooler:
                            runs.grown = max(runs.grown, peak_rss_mib(pooler.pid) - before)
                            cpu_after, waited_after = schedstat(pooler.pid)
                            runs.cpu.append(cpu_after - cpu)
                            runs.waited.append(waited_after - waited)
                        runs.times.append(elapsed)
                        runs.latencies.extend(latencies)
                        runs.p99s.append(quantile(latencies, 0.99) * 1000)
        finally:
            for pooler, _ in poolers.values():
                pooler.stop()
    rows: list[list[str]] = []
    for (name, target), runs in results.items():
        t = statistics.median(runs.times)
        direct = statistics.median(results[(name, "direct")].times)
        ms = [x * 1000 for x in runs.latencies]
        rows.append(
            [
                name,
                target,
                f"{t:.2f} s ({min(runs.times):.2f}-{max(runs.times):.2f})",
                f"{t / direct:.2f}x" if not target.startswith("hop only") else "(direct)",
                f"{quantile(ms, 0.5):.1f}",
                f"{quantile(ms, 0.99):.1f}",
                f"{min(runs.p99s):.1f}-{max(runs.p99s):.1f}",
                f"{max(ms):.1f}",
                str(len(ms)),
                f"{runs.grown:.0f} MiB" if runs.cpu else "",
                f"{statistics.median(runs.cpu) * 1000:.0f}" if runs.cpu else "",
                f"{statistics.median(runs.waited) * 1000:.0f}" if runs.waited else "",
            ]
        )
    header = ["request", "target", "time: median (range)", "vs direct", "other p50 ms", "other p99 ms"]
    header += ["other p99 per round", "other max ms", "samples", "pooler peak RSS growth"]
    header += ["pooler CPU ms", "pooler run-queue wait ms"]
    lines = [
        f"# Large messages, {dt.date.today().isoformat()}",
        "",
        f"`benchmarks/large.py --query-mb {args.query_mb} --bind-mb {args.bind_mb} --result-mb {args.result_mb}"
        f" --rounds {args.rounds}{' --compiled' if args.compiled else ''}"
        f"{''.join(' --also ' + also.split('=')[0] + '=…' for also in args.also)}"
        f"{' --pgbouncer' if args.pgbouncer else ''}{'' if args.pure else ' --no-pure'}"
        f"{'' if args.nice is None else f' --nice {args.nice}'}` at {args.commit or '?'}; {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}. "
        "pgfleet: one process, transaction mode, uvloop.",
        "Pooler CPU and run-queue wait: of its loop's thread, per long request, median over the rounds"
        f"{'' if args.nice is None else f'; nice {args.nice}: the pooler run at that niceness'}.",
        "'other': a second client's `SELECT 1` latency sampled (every 5 ms, from a process of its own) while the long request runs; "
        "'hop only': the long request straight to PostgreSQL, the second client through pgfleet (through PgBouncer: "
        "'hop only pgbouncer').",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=0, help=argparse.SUPPRESS)  # the second client
    parser.add_argument("--query-mb", type=int, default=100)
    parser.add_argument("--bind-mb", type=int, default=64)
    parser.add_argument("--result-mb", type=int, default=100, help="a long result (0: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiled", default="", help="directory of the compiled build (make compiled), run beside")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=PYTHONPATH",
        help="one more pooler build to run beside (e.g. an earlier commit's tree), repeatable",
    )
    parser.add_argument("--pgbouncer", action="store_true", help="PgBouncer beside (and its hop only)")
    parser.add_argument("--no-pure", dest="pure", action="store_false", help="without the pure-Python build")
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="also each pooler again with this scheduling niceness (e.g. -10: it gets a core first)",
    )
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args()
    if args.sample:
        asyncio.run(sample_latency(args.sample))
        return
    if not args.pure and not args.compiled:
        parser.error("--no-pure needs --compiled")
    if args.pgbouncer and pgbouncer_path() is None:
        parser.error("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    if args.compiled:
        args.compiled = str(Path(args.compiled).resolve())
    git = ["git", "rev-parse", "--short", "HEAD"]
    args.commit = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    lines = asyncio.run(run(args))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
