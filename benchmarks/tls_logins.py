"""TLS logins through pooler variants, with libpq's SSLRequest negotiation and with
PostgreSQL 17's direct TLS (`sslnegotiation=direct`): pooler CPU per login.

    make compiled && .venv/bin/python -P benchmarks/tls_logins.py \\
        --variant before=/tmp/old-compiled --variant after=build/compiled --variant pgbouncer \\
        --rounds 4 --duration 5 --out benchmarks/results/NAME.md

pgbench (PostgreSQL 15 here) cannot negotiate TLS directly, so the clients are threads of
psycopg, whose bundled libpq (17 or later) can: each connects over TLS, runs `SELECT 1`
and disconnects, again and again, as a serverless crowd does. Each variant (a pgfleet
build put on PYTHONPATH: a `make compiled` tree, or `sources`; or `pgbouncer`) runs as one
process in front of one throwaway PostgreSQL with TLS on both legs (`require`, an ECDSA
P-256 certificate made for the run); the combinations of variant and negotiation take
turns round after round. PgBouncer 1.18 does not speak direct TLS: it runs with SSLRequest
only. The pooler's user+system CPU over a run divided by the logins is its CPU per login.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from pgfleet.devtools.procs import PoolerProcess, free_port, start_pgbouncer, start_pgfleet
from pgfleet.devtools.tempdb import TempPostgres

# run.py's helpers: the benchmark's certificates, configs, CPU reading and report header
# (`python -P`, as the checkout root must not shadow `operator`, leaves this folder off sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    compiled_build,
    machine,
    make_tls,
    pooler_config,
    tree_cpu_seconds,
    versions,
    wait_ready_line,
)

DB = "bench"


@dataclass
class Combo:
    variant: str
    negotiation: str  # libpq's sslnegotiation: postgres (SSLRequest) or direct
    proc: PoolerProcess
    cpu_per_login: list[float] = field(default_factory=list)  # µs, one per round
    rates: list[float] = field(default_factory=list)  # logins/s, one per round
    errors: int = 0


def storm(port: int, negotiation: str, threads: int, duration: float) -> tuple[int, int]:
    """`threads` clients logging in over TLS, one SELECT each, for `duration` s: (logins, errors)."""
    conninfo = (
        f"host=127.0.0.1 port={port} dbname={DB} user=postgres sslmode=require "
        f"sslnegotiation={negotiation} connect_timeout=10"
    )
    deadline = time.monotonic() + duration
    counts = [0, 0]
    lock = threading.Lock()

    def client() -> None:
        done = failed = 0
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute("SELECT 1").fetchone()
                done += 1
            except psycopg.Error:
                failed += 1
        with lock:
            counts[0] += done
            counts[1] += failed

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts[0], counts[1]


def start_variant(spec: str, pg: TempPostgres, workroot: Path, tls: dict[str, str]) -> PoolerProcess:
    name, _, build = spec.partition("=")
    workdir = workroot / name
    workdir.mkdir(mode=0o755)
    config = pooler_config(pg, free_port(), 20, 2000, tls)
    if name == "pgbouncer":
        return start_pgbouncer(config, workdir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if build and build != "sources":
        if compiled_build(Path(build)) is None:
            raise SystemExit(f"{build}: not a compiled build (make compiled)")
        env["PYTHONPATH"] = str(Path(build).resolve())
    config["workers"] = 1
    proc = start_pgfleet(config, workdir, env=env)
    wait_ready_line(proc)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", help="NAME=BUILD (a compiled tree, or sources), or pgbouncer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--threads", type=int, default=8, help="clients logging in at once")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    specs = opts.variant or ["pgfleet=build/compiled", "pgbouncer"]
    workroot = Path(tempfile.mkdtemp(prefix="pgfleet-tls-logins-"))
    workroot.chmod(0o755)  # PgBouncer runs as `postgres` when we are root
    pg: TempPostgres | None = None
    combos: list[Combo] = []
    started = time.monotonic()
    try:
        pg_tls, tls = make_tls(workroot)
        pg = TempPostgres(max_connections=100, tls=pg_tls).start()
        pg.sql(f"CREATE DATABASE {DB}")
        for spec in specs:
            name = spec.partition("=")[0]
            proc = start_variant(spec, pg, workroot, tls)
            for negotiation in ("postgres", "direct") if name != "pgbouncer" else ("postgres",):
                combos.append(Combo(name, negotiation, proc))
        for combo in combos:  # fill the pools before anything is timed
            storm(combo.proc.port, combo.negotiation, opts.threads, 1.0)
        for rnd in range(opts.rounds):
            shift = rnd % len(combos)
            for combo in combos[shift:] + combos[:shift]:
                before = tree_cpu_seconds(combo.proc.pid)
                logins, errors = storm(combo.proc.port, combo.negotiation, opts.threads, opts.duration)
                cpu = tree_cpu_seconds(combo.proc.pid) - before
                combo.errors += errors
                if logins:
                    combo.cpu_per_login.append(cpu * 1e6 / logins)
                    combo.rates.append(logins / opts.duration)
                print(
                    f"round {rnd + 1}: {combo.variant} {combo.negotiation}: {logins / opts.duration:,.0f} logins/s, "
                    f"{cpu * 1e6 / max(logins, 1):,.0f} µs CPU/login",
                    flush=True,
                )
    finally:
        for proc in {id(c.proc): c.proc for c in combos}.values():
            proc.stop()
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(workroot, ignore_errors=True)
    report = render(opts, combos, time.monotonic() - started)
    print("\n" + report)
    if opts.out:
        opts.out.write_text(report)
        print(f"written to {opts.out}")
    return 0


def render(opts: argparse.Namespace, combos: list[Combo], elapsed: float) -> str:
    lines = [f"# TLS logins, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", "", f"- machine: {machine()}"]
    lines += [f"- {name}: {version}" for name, version in versions().items() if name != "pgbench"]
    lines.append(f"- client: psycopg {psycopg.__version__}, libpq {psycopg.pq.version()} (bundled)")
    lines.append(
        f"- {opts.threads} client threads, each: connect over TLS (sslmode=require), SELECT 1, disconnect; "
        f"{opts.duration:g} s per run, {opts.rounds} rounds, the combinations taking turns; run took "
        f"{elapsed / 60:.1f} min"
    )
    lines += [
        "",
        "| variant | negotiation | logins/s | pooler CPU µs/login | spread | errors |",
        "|---|---|---|---|---|---|",
    ]
    for combo in combos:
        values = combo.cpu_per_login
        mean = statistics.fmean(values) if values else 0.0
        spread = f"±{(max(values) - min(values)) / mean * 50:.0f}%" if len(values) > 1 and mean else "—"
        rate = statistics.fmean(combo.rates) if combo.rates else 0.0
        negotiation = "direct (ALPN postgresql)" if combo.negotiation == "direct" else "SSLRequest"
        lines.append(f"| {combo.variant} | {negotiation} | {rate:,.0f} | {mean:,.0f} | {spread} | {combo.errors} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
