"""`make demo`: pgfleet at work, in about half a minute.

Starts a throwaway PostgreSQL, puts pgfleet in front of it in transaction mode with a
small pool, drives it with pgbench through the pooler (100 clients, TPC-B-like
transactions by default), watches pg_stat_activity and the pooler's accepted
connections while it runs, and says what happened: transactions per second, client
connections served, and how few PostgreSQL backends served them. Everything it starts
is stopped at the end.

    .venv/bin/python -m pgfleet.devtools.demo [--clients 100] [--duration 15] [--pool-size 10] [--select-only]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .pgbench import PgbenchArgs, PgbenchResult, pgbench_init, pgbench_path, run_pgbench
from .procs import (
    PoolerProcess,
    ProcessFailed,
    ToolMissing,
    established_connections,
    free_port,
    pgfleet_available,
    raise_nofile,
    start_pgfleet,
    transaction_pool_config,
)
from .tempdb import TempPostgres, find_bindir

DB = "demo"


@dataclass
class Peaks:
    """Highest values seen by the sampler."""

    backends: int = 0  # PostgreSQL client backends connected to the demo database
    active: int = 0  # of which running a query at the time
    clients: int = 0  # client connections the pooler held
    samples: int = 0


class Sampler(threading.Thread):
    """Samples pg_stat_activity (over the unix socket) and the pooler's client connections."""

    def __init__(self, pg: TempPostgres, pooler_port: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="pg_stat_activity sampler")
        self.pg, self.pooler_port, self.interval = pg, pooler_port, interval
        self.peaks = Peaks()
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        query = (
            "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity "
            f"WHERE backend_type = 'client backend' AND datname = '{DB}'"
        )
        while not self._stop_event.wait(self.interval):
            try:
                total, active = (int(v) for v in self.pg.sql(query).split("|"))
            except (RuntimeError, ValueError) as exc:
                self.error = str(exc)
                continue
            peaks = self.peaks
            peaks.backends = max(peaks.backends, total)
            peaks.active = max(peaks.active, active)
            peaks.clients = max(peaks.clients, established_connections(self.pooler_port))
            peaks.samples += 1

    def stop(self) -> Peaks:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peaks


def preflight() -> str | None:
    """Why the demo cannot run here, or None when it can."""
    try:
        find_bindir()
        pgbench_path()
    except (RuntimeError, ToolMissing) as exc:
        return str(exc)
    if not pgfleet_available():
        return (
            "the pgfleet pooler is not runnable here (the module pgfleet.pooler.cli is missing): "
            "install the project with `make venv` (pip install -e .) from a complete checkout"
        )
    return None


def say(text: str = "") -> None:
    print(text, flush=True)


def report(args: PgbenchArgs, result: PgbenchResult, peaks: Peaks, history_rows: int | None, pool_size: int) -> None:
    say()
    say("What happened")
    say(f"  throughput        {result.tps or 0:,.0f} transactions/s ({result.transactions:,} in {args.duration:g} s, "
        f"{result.failed} failed, average latency {result.latency_ms or 0:.1f} ms)")  # fmt: skip
    say(f"  client side       {args.clients} pgbench client connections, served by pgfleet "
        f"(at most {peaks.clients} open on the pooler at once)")  # fmt: skip
    say(f"  PostgreSQL side   at most {peaks.backends} backends for those clients "
        f"(at most {peaks.active} running a query at once; pool size {pool_size}; "
        f"{peaks.samples} samples of pg_stat_activity)")  # fmt: skip
    if peaks.backends:
        ratio = args.clients / peaks.backends
        say(f"  ratio             {args.clients} clients : {peaks.backends} backends = {ratio:.0f}:1")
    if history_rows is not None:
        verdict = "one per transaction" if history_rows == result.transactions else "EXPECTED one per transaction"
        say(f"  data              pgbench_history has {history_rows:,} rows ({verdict})")


def run_demo(clients: int, duration: float, pool_size: int, select_only: bool, scale: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pgfleet-demo-"))
    pg: TempPostgres | None = None
    pooler: PoolerProcess | None = None
    sampler: Sampler | None = None
    try:
        raise_nofile(clients + 1024)
        say(f"pgfleet demo: {clients} pgbench clients -> pgfleet (transaction mode, pool of {pool_size}) -> PostgreSQL")
        pg = TempPostgres(max_connections=max(100, pool_size + 20)).start()
        say(f"  PostgreSQL        started on {pg.host}:{pg.port} (max_connections {pg.max_connections})")
        pg.sql(f"CREATE DATABASE {DB}")
        pgbench_init(pg.host, pg.port, DB, scale=scale)
        say(f"  pgbench -i        scale {scale} ({scale * 100_000:,} accounts)")
        config = transaction_pool_config(
            pg.host, pg.port, DB, listen_port=free_port(), pool_size=pool_size, max_clients=clients + 100
        )
        pooler = start_pgfleet(config, workdir)
        say(f"  pgfleet           listening on {pooler.host}:{pooler.port} (pid {pooler.pid})")
        args = PgbenchArgs(clients=clients, jobs=2, duration=duration, mode="simple", select_only=select_only)
        script = "select-only (-S)" if select_only else "TPC-B-like: BEGIN; 3 UPDATEs, SELECT, INSERT; END"
        say(f"  pgbench           {clients} clients for {duration:g} s through pgfleet, {script} ...")
        sampler = Sampler(pg, pooler.port)
        sampler.start()
        result = run_pgbench(pooler.host, pooler.port, DB, args)
        peaks = sampler.stop()
        if not result.ok:
            say(f"\npgbench failed through pgfleet: {result.error}")
            say("pgfleet log (last lines):\n" + pooler.log_tail(20))
            return 1
        history = None if select_only else int(pg.sql("SELECT count(*) FROM pgbench_history", dbname=DB))
        report(args, result, peaks, history, pool_size)
        if not pooler.alive():
            say(f"\npgfleet exited during the demo (code {pooler.popen.returncode}):\n{pooler.log_tail(20)}")
            return 1
        return 0
    except (RuntimeError, ToolMissing, ProcessFailed, OSError) as exc:
        say(f"\ndemo failed: {exc}")
        if pg is not None and pg.log().strip():
            say("PostgreSQL log (last lines):\n" + "\n".join(pg.log().splitlines()[-10:]))
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted; cleaning up")
        return 130
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if pooler is not None:
            pooler.stop()
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start PostgreSQL + pgfleet, drive it with pgbench, say what happened."
    )
    parser.add_argument("--clients", type=int, default=100, help="pgbench clients (default 100)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of pgbench (default 15)")
    parser.add_argument("--pool-size", type=int, default=10, help="pgfleet default_pool_size (default 10)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    parser.add_argument("--select-only", action="store_true", help="pgbench -S instead of TPC-B-like transactions")
    opts = parser.parse_args(argv)
    problem = preflight()
    if problem:
        print(f"pgfleet demo cannot run: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    code = run_demo(opts.clients, opts.duration, opts.pool_size, opts.select_only, opts.scale)
    say(f"\n(done in {time.monotonic() - started:.0f} s; PostgreSQL and pgfleet stopped, temporary files removed)")
    return code


if __name__ == "__main__":
    sys.exit(main())
