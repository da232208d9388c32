"""pgbench through pgfleet, PgBouncer and straight to PostgreSQL, in one run.

    make compiled && .venv/bin/python benchmarks/run.py [--quick] [--duration S] [--rounds N] [--workers N]

One throwaway PostgreSQL (`pgbench -i`) with, in front of it and in transaction mode with
the same pool size: pgfleet with `workers: N` (default: one per CPU), pgfleet as one
process (`pgfleet-1`), both as the image ships them (the hot path compiled by mypyc, from
`make compiled`); pgfleet as one process from the pure-Python sources (`pgfleet-py`); and
PgBouncer (if installed). Each case (pgbench `-S` in a query
mode at a client count, or a `-C` connection storm) runs once per target per round, the
targets taking turns so that drift hits all of them alike. Then each pooler, started
afresh, holds 10,000 idle clients while the resident memory of its processes is read.
Tables go to stdout and to benchmarks/results/. See benchmarks/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgfleet.devtools.idleclients import IdleClients
from pgfleet.devtools.pgbench import PgbenchArgs, PgbenchResult, pgbench_init, pgbench_path, run_pgbench
from pgfleet.devtools.procs import (
    PoolerProcess,
    ProcessFailed,
    ToolMissing,
    cpu_seconds,
    descendants,
    free_port,
    pgbouncer_path,
    pgfleet_available,
    raise_nofile,
    rss_kib,
    start_pgbouncer,
    start_pgfleet,
    time_wait_sockets,
    transaction_pool_config,
)
from pgfleet.devtools.tempdb import PASSWORDS, TempPostgres
from pgfleet.pooler.compiled import COMPILED_LABEL, SOURCES_LABEL
from pgfleet.pooler.userlist import dump_userlist

ROOT = Path(__file__).resolve().parent.parent
DB = "bench"
DIRECT, PGFLEET, PGFLEET_1, PGFLEET_PY, PGBOUNCER = "direct", "pgfleet", "pgfleet-1", "pgfleet-py", "pgbouncer"
# pgfleet as one process from another compiled build (--baseline): a before/after in one run.
PGFLEET_BASE = "pgfleet-1-baseline"
# pgfleet with --workers N, and as one process (both compiled when built), and from the sources
PGFLEETS = (PGFLEET, PGFLEET_1, PGFLEET_PY, PGFLEET_BASE)
POOLERS = (*PGFLEETS, PGBOUNCER)
TARGETS = (DIRECT, PGFLEET, PGFLEET_1, PGFLEET_PY, PGBOUNCER)  # the default; --baseline adds PGFLEET_BASE
LOUD_LEVELS = ("WARNING", "ERROR", "CRITICAL")
# --tls both: every target twice, in the clear and as NAME+tls, taking turns in each round.
TLS_SUFFIX = "+tls"
TIME_WAIT_CALM = 2_000


# -- what runs -----------------------------------------------------------------------------


# The SCRAM storm's user: the throwaway PostgreSQL's, which it asks for SCRAM (tempdb).
SCRAM_USER = "scramuser"


@dataclass(frozen=True)
class Case:
    name: str
    args: PgbenchArgs
    auth: str = "trust"  # scram: as SCRAM_USER, against poolers started with SCRAM client auth


def build_cases(
    modes: list[str], clients: list[int], storm_clients: int, duration: float, storm_auths: tuple[str, ...] = ("trust",)
) -> list[Case]:
    """`-S` in each query mode at each client count, then a `-C` storm in simple mode per client auth."""
    cases = [
        Case(f"-S -M {mode}, {n} clients", PgbenchArgs(clients=n, jobs=2, duration=duration, mode=mode))
        for mode in modes
        for n in clients
    ]
    if storm_clients:
        storm = PgbenchArgs(clients=storm_clients, jobs=2, duration=duration, mode="simple", connect=True)
        for auth in storm_auths:
            suffix = ", SCRAM" if auth == "scram" else ""
            cases.append(Case(f"-S -C (connection per txn), {storm_clients} clients{suffix}", storm, auth))
    return cases


@dataclass
class Target:
    """Somewhere pgbench can connect: PostgreSQL itself or a pooler we started (and can restart)."""

    name: str
    host: str
    port: int
    start: Callable[[], PoolerProcess] | None = None
    proc: PoolerProcess | None = None
    restarts: int = 0
    sslmode: str | None = None  # pgbench's; None: libpq's default (prefer)

    @property
    def kind(self) -> str:
        """direct, pgfleet, pgfleet-1, pgfleet-py or pgbouncer, whether over TLS or not."""
        return base_name(self.name)

    def ensure_running(self, notes: list[str]) -> None:
        if self.start is None or (self.proc is not None and self.proc.alive()):
            return
        if self.proc is not None:
            notes.append(
                f"{self.name} had exited (code {self.proc.popen.returncode}); restarted it. Log tail:\n"
                + indent(self.proc.log_tail(15))
            )
            self.restarts += 1
        self.proc = self.start()
        self.port = self.proc.port


def base_name(name: str) -> str:
    return name.removesuffix(TLS_SUFFIX)


@dataclass
class Outcome:
    runs: list[PgbenchResult] = field(default_factory=list)
    cpu: float = 0.0  # pooler CPU seconds over all runs
    run_cpu: list[float] = field(default_factory=list)  # pooler CPU µs/txn of each run
    pg_cpu: float = 0.0  # PostgreSQL CPU seconds (all its processes) over all runs
    time_wait: list[int] = field(default_factory=list)  # TIME_WAIT sockets as each -C run began

    @property
    def failed(self) -> PgbenchResult | None:
        return next((r for r in self.runs if not r.ok), None)

    @property
    def tps(self) -> float | None:
        if not self.runs or self.failed:
            return None
        return statistics.fmean(r.tps or 0.0 for r in self.runs)

    @property
    def spread(self) -> float | None:
        """(max - min) / mean of the rounds' tps, when there are several."""
        values = [r.tps or 0.0 for r in self.runs]
        mean = self.tps
        if len(values) < 2 or not mean:
            return None
        return (max(values) - min(values)) / mean

    def cpu_us_per_txn(self) -> float | None:
        txns = sum(r.transactions for r in self.runs)
        return self.cpu * 1e6 / txns if txns and not self.failed else None

    def cpu_spread(self) -> float | None:
        """(max - min) / mean of the rounds' pooler CPU µs/txn, when there are several."""
        mean = self.cpu_us_per_txn()
        if len(self.run_cpu) < 2 or not mean:
            return None
        return (max(self.run_cpu) - min(self.run_cpu)) / mean

    def pg_cpu_us_per_txn(self) -> float | None:
        txns = sum(r.transactions for r in self.runs)
        return self.pg_cpu * 1e6 / txns if txns and not self.failed else None


# -- formatting ----------------------------------------------------------------------------


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def target_labels(workers: int) -> dict[str, str]:
    """How the tables name each target: pgfleet says how many processes it ran as, and
    `pure Python` marks the build from the sources; `, TLS` marks a target over TLS (--tls both)."""
    one = "pgfleet (1 process)"
    labels = {
        PGFLEET: f"pgfleet ({workers} workers)" if workers > 1 else one,
        PGFLEET_1: one,
        PGFLEET_PY: "pgfleet (1 process, pure Python)",
        PGFLEET_BASE: "pgfleet (1 process, baseline)",
    }
    for name in TARGETS:
        labels[name + TLS_SUFFIX] = labels.get(name, name) + ", TLS"
    return labels


def fmt_num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}x"


def case_table(
    case: Case, outcomes: dict[str, Outcome], with_case: bool = False, labels: Mapping[str, str] | None = None
) -> list[str]:
    rows = []
    for name, outcome in outcomes.items():
        # Beside the direct and PgBouncer runs of the same kind (over TLS or in the clear).
        suffix = name[len(base_name(name)) :]
        direct = outcomes.get(DIRECT + suffix, Outcome()).tps
        bouncer = outcomes.get(PGBOUNCER + suffix, Outcome()).tps
        failed = outcome.failed
        tps = f"fails: {shorten(failed.error or '')}" if failed else fmt_num(outcome.tps)
        spread = outcome.spread
        cells = [
            tps,
            "—" if spread is None else f"±{spread * 50:.0f}%",
            fmt_ratio(outcome.tps, direct),
            fmt_ratio(outcome.tps, bouncer),
            fmt_num(outcome.cpu_us_per_txn(), 1) if base_name(name) != DIRECT else "—",
            fmt_num(outcome.pg_cpu_us_per_txn(), 1),
        ]
        rows.append(([case.name] if with_case else []) + [(labels or {}).get(name, name), *cells])
    header = (["case"] if with_case else []) + [
        "target",
        "tps",
        "spread",
        "x direct",
        "x PgBouncer",
        "pooler CPU µs/txn",
        "PostgreSQL CPU µs/txn",
    ]
    return markdown_table(header, rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- running -------------------------------------------------------------------------------


def measure(
    target: Target, args: PgbenchArgs, notes: list[str], login: tuple[str, str | None] = ("postgres", None)
) -> tuple[PgbenchResult, float]:
    """One pgbench run against `target` as `login` (user, password); returns the result and
    the pooler's CPU seconds during it."""
    try:
        target.ensure_running(notes)
    except ProcessFailed as exc:
        return PgbenchResult(ok=False, returncode=-1, error=f"{target.name} does not start: {exc}".splitlines()[0]), 0.0
    pid = target.proc.pid if target.proc else None
    before = tree_cpu_seconds(pid) if pid else 0.0
    result = run_pgbench(target.host, target.port, DB, args, user=login[0], password=login[1], sslmode=target.sslmode)
    after = tree_cpu_seconds(pid) if pid else 0.0
    if target.proc is not None and not target.proc.alive():
        notes.append(f"{target.name} exited during `{' '.join(args.argv())}`.")
    return result, after - before


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and all its living descendants, plus the children it reaped.

    For pgfleet with workers that is the supervisor and every worker (all live for the
    whole run, so the before/after difference is theirs); a worker that died and was
    started again still counts, through the supervisor's cutime+cstime.
    """
    return cpu_seconds(pid, tree=True, reaped=True)


# The benchmark's PostgreSQL: its postmaster's pid file, set once the server runs.
POSTMASTER_PID_FILE: list[Path] = []


def postgres_cpu_seconds() -> float:
    """utime+stime of the whole PostgreSQL server: living processes, and the children it reaped.

    Read from /proc, so it needs no extension; backends that exited (a -C storm) count
    through the postmaster's cutime+cstime.
    """
    if not POSTMASTER_PID_FILE:
        return 0.0
    try:
        pid = int(POSTMASTER_PID_FILE[0].read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return tree_cpu_seconds(pid)


def settle_time_wait(max_wait: float, below: int = TIME_WAIT_CALM) -> int:
    """Wait (up to `max_wait` s) for TIME_WAIT sockets left by earlier storms to expire; return the count.

    Linux keeps a closed connection's port in TIME_WAIT for 60 s, and connect() slows down as
    tens of thousands pile up, which would penalise whichever target runs after a fast one.
    """
    deadline = time.monotonic() + max_wait
    count = time_wait_sockets()
    while count >= below and time.monotonic() < deadline:
        time.sleep(1.0)
        count = time_wait_sockets()
    return count


def run_cases(
    targets: list[Target],
    cases: list[Case],
    rounds: int,
    notes: list[str],
    labels: Mapping[str, str],
    scram_targets: list[Target] | None = None,
) -> dict[str, dict[str, Outcome]]:
    """Each case on each target, round after round. A SCRAM case runs on `scram_targets`
    (the same poolers started with SCRAM client auth, PostgreSQL itself for direct)."""
    results: dict[str, dict[str, Outcome]] = {}
    all_targets = targets
    for index, case in enumerate(cases):
        targets = scram_targets if case.auth == "scram" and scram_targets is not None else all_targets
        login = (SCRAM_USER, PASSWORDS[SCRAM_USER]) if case.auth == "scram" else ("postgres", None)
        outcomes = {t.name: Outcome() for t in targets}
        for rnd in range(rounds):
            shift = (index + rnd) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                if case.args.connect:
                    outcomes[target.name].time_wait.append(settle_time_wait(max(10.0, min(60.0, case.args.duration))))
                pg_before = postgres_cpu_seconds()
                result, cpu = measure(target, case.args, notes, login)
                outcomes[target.name].runs.append(result)
                outcomes[target.name].cpu += cpu
                if result.ok and result.transactions:
                    outcomes[target.name].run_cpu.append(cpu * 1e6 / result.transactions)
                time.sleep(0.3)  # backends of closed connections exit and get reaped into cutime
                outcomes[target.name].pg_cpu += postgres_cpu_seconds() - pg_before
                status = (
                    f"{result.tps:,.0f} tps" if result.ok and result.tps else f"FAILED: {shorten(result.error or '')}"
                )
                name = labels.get(target.name, target.name)
                print(f"  [{case.name}] round {rnd + 1}/{rounds} {name}: {status}", flush=True)
        results[case.name] = outcomes
        if case.args.connect:
            counts = ", ".join(
                f"{labels.get(name, name)} {'/'.join(f'{n:,}' for n in o.time_wait)}" for name, o in outcomes.items()
            )
            notes.append(f"`{case.name}`: sockets in TIME_WAIT as each run began: {counts}.")
        print(f"\n### {case.name}\n" + "\n".join(case_table(case, outcomes, labels=labels)) + "\n", flush=True)
    return results


@dataclass
class Memory:
    target: str
    before_kib: int = 0
    after_kib: int = 0
    connected: int = 0
    failed: int = 0
    seconds: float = 0.0
    processes: int = 0  # the pooler's process tree while the idle clients were connected
    error: str | None = None

    def per_client(self) -> float | None:
        return (self.after_kib - self.before_kib) / self.connected if self.connected else None


def measure_memory(name: str, start: Callable[[], PoolerProcess], count: int, notes: list[str]) -> Memory:
    """Start a fresh pooler, log 10 clients in and out, then hold `count` idle clients; read VmRSS.

    RSS is summed over the pooler's process tree: for pgfleet with workers, the supervisor
    and every worker.
    """
    memory = Memory(name)
    proc = None
    try:
        proc = start()
        with IdleClients(proc.host, proc.port, 10, dbname=DB) as warm:
            warm.wait_ready(60)
        time.sleep(0.5)
        memory.before_kib = rss_kib(proc.pid, tree=True)
        with IdleClients(proc.host, proc.port, count, dbname=DB) as idle:
            ready = idle.wait_ready(600)
            time.sleep(1.0)
            memory.after_kib = rss_kib(proc.pid, tree=True)
            memory.processes = len(descendants(proc.pid))
            memory.connected, memory.failed, memory.seconds = ready.connected, ready.failed, ready.seconds
            memory.error = ready.first_error
        if not proc.alive():
            memory.error = f"{name} exited (code {proc.popen.returncode}): {shorten(proc.log_tail(5), 200)}"
    except (ProcessFailed, RuntimeError) as exc:
        memory.error = shorten(str(exc), 200)
    finally:
        if proc is not None:
            proc.stop()
            if name in PGFLEETS:
                scan_log(proc, notes, f"the memory case ({name})")
    return memory


def memory_table(rows: list[Memory], count: int, labels: Mapping[str, str] | None = None) -> list[str]:
    body = []
    for m in rows:
        per = m.per_client()
        body.append([
            (labels or {}).get(m.target, m.target),
            fmt_num(m.processes) if m.processes else "—",
            fmt_num(m.before_kib),
            fmt_num(m.after_kib) if m.connected else "—",
            fmt_num(per, 2) if per is not None else "—",
            f"{m.connected:,}/{count:,}" + (f" ({m.failed:,} failed)" if m.failed else ""),
            fmt_num(m.seconds, 1),
            shorten(m.error or "", 120),
        ])  # fmt: skip
    header = [
        "target",
        "processes",
        "RSS before KiB",
        f"RSS with {count:,} idle KiB",
        "KiB per idle client",
        "clients",
        "connect s",
        "error",
    ]
    return markdown_table(header, body)


# -- set-up --------------------------------------------------------------------------------


def pooler_config(
    pg: TempPostgres, port: int, pool_size: int, max_clients: int, tls: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The config every pooler runs: PgBouncer's setting names, transaction mode, trust.

    pgfleet's `workers` is not in it: `starter` adds that to pgfleet's copy only (PgBouncer
    would refuse the unknown setting). `tls`: the TLS settings both poolers get (--tls).
    """
    config = transaction_pool_config(
        pg.host, pg.port, DB, listen_port=port, pool_size=pool_size, max_clients=max_clients
    )
    return {**config, **(tls or {})}


def make_tls(workroot: Path) -> tuple[tuple[bytes, bytes, bytes], dict[str, str]]:
    """A CA and a certificate for 127.0.0.1 (trustme): PostgreSQL's (chain, key, CA) and the
    poolers' TLS settings, `require` on both legs as a managed database demands."""
    import trustme  # a test dependency: the benchmark runs from the project's .venv

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
    key = cert.private_key_pem.bytes()
    certs = workroot / "certs"
    certs.mkdir(mode=0o755)
    (certs / "pooler.crt").write_bytes(chain)
    (certs / "pooler.key").write_bytes(key)
    (certs / "pooler.key").chmod(0o644)  # PgBouncer runs as `postgres` when we are root
    settings = {
        "client_tls_sslmode": "require",
        "client_tls_key_file": str(certs / "pooler.key"),
        "client_tls_cert_file": str(certs / "pooler.crt"),
        "server_tls_sslmode": "require",
    }
    return (chain, key, ca.cert_pem.bytes()), settings


def starter(
    kind: str,
    pg: TempPostgres,
    workroot: Path,
    pool_size: int,
    max_clients: int,
    workers: int,
    compiled: Path | None,
    tls: Mapping[str, str] | None = None,
    scram_secret: str | None = None,
    tag: str = "",
) -> Callable[[], PoolerProcess]:
    """A function that starts a fresh pooler of `kind` on a new port in its own directory.

    With `scram_secret` (SCRAM_USER's verifier, as pg_authid holds it), the pooler asks
    its clients for SCRAM (auth_type scram-sha-256, the verifier in its auth_file) and
    logs in to PostgreSQL as that user by SCRAM pass-through, for the SCRAM storm.

    `workers` goes into pgfleet's config (1 for pgfleet-1 and pgfleet-py), never into
    PgBouncer's. pgfleet and pgfleet-1 import the package from `compiled` (an install of
    the compiled build) when given; pgfleet-py always from the sources.
    """
    counter = iter(range(1_000_000))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs_compiled = compiled is not None and kind != PGFLEET_PY
    if runs_compiled:
        env["PYTHONPATH"] = str(compiled)
    build = COMPILED_LABEL if runs_compiled else SOURCES_LABEL  # as the ready line says it

    def start() -> PoolerProcess:
        workdir = workroot / f"{kind}{tag}{'-scram' if scram_secret is not None else ''}-{next(counter)}"
        workdir.mkdir(mode=0o755)
        config = pooler_config(pg, free_port(), pool_size, max_clients, tls)
        if scram_secret is not None:
            auth_file = workdir / "userlist.txt"
            auth_file.write_text(dump_userlist({SCRAM_USER: scram_secret}))
            config["auth_type"] = "scram-sha-256"
            config["auth_file"] = str(auth_file)
        if kind == PGBOUNCER:
            return start_pgbouncer(config, workdir)
        config["workers"] = workers if kind == PGFLEET else 1
        proc = start_pgfleet(config, workdir, env=env)
        ready = wait_ready_line(proc)
        if f"{build})" not in ready:
            proc.stop()
            raise ProcessFailed(f"{kind} was to run the {build} build, but says: {ready}")
        return proc

    return start


def wait_ready_line(proc: PoolerProcess, timeout: float = 30.0) -> str:
    """pgfleet's ready line, once it is printed; it names the build that runs.

    With workers, the port accepts connections as soon as the first worker listens; until
    the others do, SO_REUSEPORT hands them all the connections, which would skew the first
    run. The supervisor prints the line when every worker is ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if "pgfleet-pooler ready on" in line:
                    return line
        if not proc.alive():
            raise ProcessFailed(f"pgfleet exited with code {proc.popen.returncode} while starting\n{proc.log_tail()}")
        time.sleep(0.05)
    proc.stop()
    raise ProcessFailed(f"pgfleet did not print its ready line within {timeout:g}s\n{proc.log_tail()}")


def compiled_build(path: Path) -> Path | None:
    """`path` if it holds the compiled build (`make compiled`), else None."""
    package = path / "pgfleet" / "pooler"
    return path if any(package.glob("client.*.so")) else None


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.splitlines()[0].strip() if out else "?"

    found: dict[str, str] = {"pgbench": first_line([pgbench_path(), "--version"])}
    exe = pgbouncer_path()
    if exe:
        found["PgBouncer"] = first_line([exe, "--version"])
    found["python"] = platform.python_version()
    try:
        found["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        found["uvloop"] = "not installed"
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "pooler"], capture_output=True, text=True)
    found["pgfleet commit"] = commit + (" (pooler/ has uncommitted changes)" if dirty.stdout.strip() else "")
    return found


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pgbench: direct vs pgfleet vs PgBouncer")
    parser.add_argument("--quick", action="store_true", help="short runs, one round (about 2 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per pgbench run (default 15, quick 3)")
    parser.add_argument("--rounds", type=int, help="rounds over all targets per case (default 2, quick 1)")
    parser.add_argument("--modes", default="simple,extended", help="query modes, comma-separated (add: prepared)")
    parser.add_argument("--clients", default="10,50,200", help="client counts, comma-separated")
    parser.add_argument("--storm-clients", type=int, default=50, help="clients of the -C case; 0 skips it")
    parser.add_argument(
        "--storm-auth",
        default="trust,scram",
        help="client auth of the -C case, comma-separated: trust, scram (SCRAM-SHA-256 as scramuser, "
        "its verifier in each pooler's auth_file, SCRAM pass-through to PostgreSQL)",
    )
    parser.add_argument("--idle-clients", type=int, default=10_000, help="idle clients of the memory case; 0 skips it")
    parser.add_argument("--pool-size", type=int, default=20, help="default_pool_size of every pooler (in total)")
    parser.add_argument("--scale", type=int, default=5, help="pgbench -i scale factor")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="`workers` of the pgfleet target (default: one per CPU); pgfleet-1 always runs as one process",
    )
    parser.add_argument(
        "--compiled",
        type=Path,
        default=ROOT / "build" / "compiled",
        help="the compiled build pgfleet and pgfleet-1 run (default build/compiled, from `make compiled`)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another compiled build (e.g. one of main made with `make compiled` in a worktree of it): "
        "also run it as one process, taking turns with the others, labelled baseline",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"which targets to run, comma-separated (default: {','.join(TARGETS)})",
    )
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/<date>[-quick].md)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (pooler logs) and say where")
    parser.add_argument(
        "--tls",
        nargs="?",
        const="on",
        default="off",
        choices=("off", "on", "both"),
        help="on: TLS on both legs: PostgreSQL with ssl = on, every pooler with client_tls_sslmode and "
        "server_tls_sslmode require, pgbench with sslmode=require (certificates made for the run); "
        "both: every target twice in the same rounds, over TLS so and in the clear (sslmode=disable, "
        "server_tls_sslmode disable), taking turns",
    )
    opts = parser.parse_args(argv)
    if not 1 <= opts.workers <= 64:
        parser.error("--workers must be between 1 and 64")
    if opts.workers > opts.pool_size:
        parser.error(f"--workers {opts.workers} exceeds --pool-size {opts.pool_size}: each worker needs a server")
    unknown = [t.strip() for t in opts.targets.split(",") if t.strip() and t.strip() not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    opts.storm_auths = tuple(a.strip() for a in opts.storm_auth.split(",") if a.strip())
    if set(opts.storm_auths) - {"trust", "scram"}:
        parser.error("--storm-auth takes trust, scram")
    opts.duration = opts.duration or (3.0 if opts.quick else 15.0)
    opts.rounds = opts.rounds or (1 if opts.quick else 2)
    if opts.out is None:
        stamp = dt.date.today().isoformat() + ("-quick" if opts.quick else "")
        opts.out = ROOT / "benchmarks" / "results" / f"{stamp}.md"
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    wanted = [t.strip() for t in opts.targets.split(",") if t.strip()]
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    clients = [int(c) for c in opts.clients.split(",") if c.strip()]
    cases = build_cases(modes, clients, opts.storm_clients, opts.duration, opts.storm_auths)
    notes: list[str] = []

    try:
        pgbench_path()
    except ToolMissing as exc:
        print(f"cannot benchmark: {exc}", file=sys.stderr)
        return 2
    labels = target_labels(opts.workers)
    if any(t in wanted for t in PGFLEETS) and not pgfleet_available():
        notes.append("pgfleet was not measured: its pooler is not runnable here (`pgfleet.pooler.cli` missing).")
        wanted = [t for t in wanted if t not in PGFLEETS]
    if opts.workers == 1 and PGFLEET in wanted and PGFLEET_1 in wanted:
        notes.append("pgfleet-1 was skipped: with --workers 1 the pgfleet target already runs as one process.")
        wanted.remove(PGFLEET_1)
    compiled = compiled_build(opts.compiled)
    if compiled is None:
        if any(t in wanted for t in (PGFLEET, PGFLEET_1)):
            notes.append(
                f"No compiled build in {opts.compiled} (`make compiled`): pgfleet and pgfleet-1 ran from the "
                "pure-Python sources, not as the image ships them."
            )
        if PGFLEET_PY in wanted and PGFLEET_1 in wanted:
            notes.append("pgfleet-py was skipped: without a compiled build it is the same as pgfleet-1.")
            wanted.remove(PGFLEET_PY)
    baseline = None
    if opts.baseline is not None:
        baseline = compiled_build(opts.baseline.resolve())
        if baseline is None:
            print(f"cannot benchmark: no compiled build in {opts.baseline} (`make compiled` there)", file=sys.stderr)
            return 2
        # Next to the build it is compared with, so that the two take turns back to back.
        wanted.insert(wanted.index(PGFLEET_1) if PGFLEET_1 in wanted else len(wanted), PGFLEET_BASE)
    if PGBOUNCER in wanted and pgbouncer_path() is None:
        notes.append("PgBouncer was not measured: `pgbouncer` is not installed.")
        wanted.remove(PGBOUNCER)

    if opts.tls != "off" and opts.idle_clients:
        notes.append("The idle-clients memory case was skipped: its clients do not speak TLS.")
        opts.idle_clients = 0
    max_clients = max(opts.idle_clients, *clients, opts.storm_clients) + 1000
    raise_nofile(max_clients + 1000)  # inherited by the poolers we spawn
    started = time.monotonic()
    workroot = Path(tempfile.mkdtemp(prefix="pgfleet-bench-"))
    workroot.chmod(0o755)  # PgBouncer runs as `postgres` when we are root
    pg: TempPostgres | None = None
    targets: list[Target] = []
    scram_targets: list[Target] = []
    try:
        with sigterm_as_interrupt():
            print(f"starting PostgreSQL and pgbench -i -s {opts.scale} ...", flush=True)
            pg_tls, tls_settings = make_tls(workroot) if opts.tls != "off" else (None, None)
            # (name, the poolers' TLS settings, pgbench's sslmode) of every target; with
            # --tls both each target twice, in the clear and over TLS, side by side.
            variants: list[tuple[str, Mapping[str, str] | None, str | None]]
            if opts.tls == "both":
                clear = {"server_tls_sslmode": "disable"}
                variants = [
                    v for n in wanted for v in ((n, clear, "disable"), (n + TLS_SUFFIX, tls_settings, "require"))
                ]
            else:
                variants = [(n, tls_settings, "require" if opts.tls == "on" else None) for n in wanted]
            # Every pooler's pool at once, a direct run's clients, and room for psql and the rest.
            poolers = sum(1 for name, _, _ in variants if base_name(name) in POOLERS)
            pg = TempPostgres(max_connections=max(clients) + poolers * opts.pool_size + 60, tls=pg_tls).start()
            pg.sql(f"CREATE DATABASE {DB}")
            POSTMASTER_PID_FILE.append(pg.datadir / "postmaster.pid")
            pgbench_init(pg.host, pg.port, DB, scale=opts.scale)

            def start_of(name: str, tls: Mapping[str, str] | None, secret: str | None = None) -> Any:
                kind = base_name(name)
                if kind not in POOLERS:
                    return None
                tag = "-tls" if name != kind else ""
                build = baseline if kind == PGFLEET_BASE else compiled
                return starter(kind, pg, workroot, opts.pool_size, max_clients, opts.workers, build, tls, secret, tag)

            starters = {name: start_of(name, tls, None) for name, tls, _ in variants if base_name(name) in POOLERS}
            for name, _, sslmode in variants:
                target = Target(name, pg.host, pg.port, starters.get(name), sslmode=sslmode)
                target.ensure_running(notes)
                targets.append(target)
                check_processes(target, opts.workers, notes)
            if any(case.auth == "scram" for case in cases):
                # Started when the SCRAM storm comes (ensure_running), stopped after it.
                secret = pg.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_USER}'").strip()
                for name, tls, sslmode in variants:
                    scram_targets.append(Target(name, pg.host, pg.port, start_of(name, tls, secret), sslmode=sslmode))
            print("targets: " + ", ".join(f"{labels.get(t.name, t.name)} on :{t.port}" for t in targets), flush=True)
            for target in targets:  # fill the pools and warm the caches before anything is timed
                measure(target, PgbenchArgs(clients=max(clients), duration=1), notes)

            results = run_cases(targets, cases, opts.rounds, notes, labels, scram_targets)
            for target in targets + scram_targets:
                if target.proc is not None:
                    target.proc.stop()
            memory = []
            if opts.idle_clients:
                for name, start in starters.items():
                    label = labels.get(name, name)
                    print(f"memory: {opts.idle_clients:,} idle clients through {label} ...", flush=True)
                    memory.append(measure_memory(name, start, opts.idle_clients, notes))
                    print("  " + "\n  ".join(memory_table(memory[-1:], opts.idle_clients, labels)), flush=True)

            for target in targets + scram_targets:
                if target.proc is not None and target.kind in PGFLEETS:
                    scan_log(target.proc, notes, f"the throughput cases ({target.name})")
            report = render_report(opts, cases, results, memory, notes, time.monotonic() - started)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (ProcessFailed, ToolMissing, RuntimeError) as exc:
        # A target that does not start at all, or PostgreSQL/pgbench -i failing: say so, no traceback.
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for target in targets + scram_targets:
            if target.proc is not None:
                target.proc.stop()
        if pg is not None:
            pg.cleanup()
        if opts.keep:
            print(f"work directory kept: {workroot}", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    print("\n" + report)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(report)
    print(f"written to {opts.out}")
    return 0


def check_processes(target: Target, workers: int, notes: list[str]) -> None:
    """Note it if pgfleet does not run as the processes asked for (a supervisor + `workers`)."""
    if target.proc is None or target.kind not in PGFLEETS:
        return
    wanted = workers if target.kind == PGFLEET else 1
    expected = 1 + wanted if wanted > 1 else 1  # the supervisor only exists with several workers
    found = len(descendants(target.proc.pid))
    if found != expected:
        notes.append(f"{target.name} ran as {found} processes, not {expected} (workers {wanted}).")


def scan_log(proc: PoolerProcess, notes: list[str], during: str) -> None:
    """Note tracebacks and errors the pooler logged during the benchmark."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    bad = [line for line in lines if "Traceback" in line or any(f" {lvl} " in line for lvl in LOUD_LEVELS)]
    if bad:
        notes.append(
            f"{proc.name} logged {len(bad)} warning/error/traceback lines during {during}; first: `{shorten(bad[0], 160)}`"
        )


def render_report(
    opts: argparse.Namespace,
    cases: list[Case],
    results: dict[str, dict[str, Outcome]],
    memory: list[Memory],
    notes: list[str],
    elapsed: float,
) -> str:
    labels = target_labels(opts.workers)
    lines = [f"# pgfleet benchmark, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", ""]
    lines.append(f"- machine: {machine()}")
    for name, version in versions().items():
        lines.append(f"- {name}: {version}")
    lines.append(
        f"- pgbench -j 2, {opts.duration:g} s per run, {opts.rounds} round(s) per case with the targets taking turns; "
        f"scale {opts.scale}; every pooler in transaction mode, default_pool_size {opts.pool_size} in total, "
        f"trust auth, 127.0.0.1; run took {elapsed / 60:.1f} min"
    )
    if any(case.auth == "scram" for case in cases):
        lines.append(
            f"- the SCRAM storm: pgbench as {SCRAM_USER}, every pooler with auth_type scram-sha-256 and that user's "
            "SCRAM verifier (from pg_authid) in its auth_file, logging in to PostgreSQL by SCRAM pass-through; "
            "direct: PostgreSQL's own SCRAM; under -C every transaction is a login, so pooler CPU µs/txn is per login"
        )
    one_too = any(PGFLEET_1 in map(base_name, outcomes) for outcomes in results.values()) or any(
        m.target == PGFLEET_1 for m in memory
    )
    lines.append(f"- pgfleet: {pgfleet_processes(opts.workers, one_too)}")
    if opts.tls == "on":
        lines.append(
            "- TLS on both legs: PostgreSQL with ssl = on, every pooler with client_tls_sslmode and server_tls_sslmode "
            "require, pgbench with sslmode=require (direct: pgbench to PostgreSQL over TLS)"
        )
    elif opts.tls == "both":
        lines.append(
            "- every target twice, taking turns in each round: `, TLS` with TLS on both legs (PostgreSQL with "
            "ssl = on, every pooler with client_tls_sslmode and server_tls_sslmode require, pgbench with "
            "sslmode=require), and in the clear (pgbench with sslmode=disable, server_tls_sslmode disable); "
            "x direct and x PgBouncer compare runs of the same kind"
        )
    ran_sources = any(PGFLEET_PY in map(base_name, outcomes) for outcomes in results.values())
    lines.append(f"- pgfleet build: {build_note(compiled_build(opts.compiled), ran_sources)}")
    if opts.baseline is not None:
        lines.append(f"- pgfleet (1 process, baseline): the compiled build in {opts.baseline}, as one process")
    lines += ["", "## Throughput", ""]
    lines.append(
        "tps is pgbench's, without initial connection time (with reconnections for -C); spread is ±half the "
        "range across rounds; pooler CPU is utime+stime of the pooler's processes (for pgfleet with workers: the "
        "supervisor and every worker) per transaction; PostgreSQL CPU is "
        "utime+stime of all the server's processes (backends, reaped ones included) per transaction."
    )
    lines.append("")
    for index, case in enumerate(cases):
        table = case_table(case, results[case.name], with_case=True, labels=labels)
        lines += table if index == 0 else table[2:]
    if opts.tls == "both":
        lines += ["", *tls_summary(cases, results, labels)]
    if memory:
        lines += ["", f"## Memory with {opts.idle_clients:,} idle clients", ""]
        lines.append(
            "Each pooler started afresh; RSS (VmRSS) after 10 clients logged in and out, then with the idle clients "
            "connected (startup + trust auth done, ReadyForQuery received). RSS is summed over each pooler's "
            "processes (counted in the processes column: pgfleet with workers is a supervisor and its workers), "
            "so shared library pages count once per process."
        )
        lines += ["", *memory_table(memory, opts.idle_clients, labels)]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def tls_summary(cases: list[Case], results: dict[str, dict[str, Outcome]], labels: Mapping[str, str]) -> list[str]:
    """--tls both: each pgfleet beside PgBouncer in the clear and over TLS, from the same rounds."""
    lines = ["## TLS against the clear, same rounds", ""]
    lines.append(
        "x PgBouncer: tps beside PgBouncer's of the same kind; CPU: pooler CPU µs per transaction (per login "
        "under -C), ± half the range across rounds; CPU x PgBouncer: pgfleet's CPU per transaction over "
        "PgBouncer's (lower is better)."
    )
    lines.append("")
    header = [
        "case",
        "target",
        "x PgBouncer, clear",
        "x PgBouncer, TLS",
        "CPU clear",
        "CPU TLS",
        "CPU x PgBouncer, clear",
        "CPU x PgBouncer, TLS",
    ]
    rows = []

    def cpu_cell(outcome: Outcome) -> str:
        spread = outcome.cpu_spread()
        return fmt_num(outcome.cpu_us_per_txn(), 1) + ("" if spread is None else f" ±{spread * 50:.0f}%")

    for case in cases:
        outcomes = results[case.name]
        clear_bouncer = outcomes.get(PGBOUNCER, Outcome())
        tls_bouncer = outcomes.get(PGBOUNCER + TLS_SUFFIX, Outcome())
        for kind in (*PGFLEETS, PGBOUNCER):
            clear, tls = outcomes.get(kind), outcomes.get(kind + TLS_SUFFIX)
            if clear is None or tls is None:
                continue
            rows.append(
                [
                    case.name,
                    labels.get(kind, kind),
                    fmt_ratio(clear.tps, clear_bouncer.tps),
                    fmt_ratio(tls.tps, tls_bouncer.tps),
                    cpu_cell(clear),
                    cpu_cell(tls),
                    fmt_ratio(clear.cpu_us_per_txn(), clear_bouncer.cpu_us_per_txn()),
                    fmt_ratio(tls.cpu_us_per_txn(), tls_bouncer.cpu_us_per_txn()),
                ]
            )
    return lines + markdown_table(header, rows)


def build_note(compiled: Path | None, ran_sources: bool) -> str:
    """Which build the pgfleet targets ran, for the report header."""
    if compiled is None:
        return "every pgfleet target ran from the pure-Python sources (no compiled build)"
    note = f"pgfleet and pgfleet-1 ran the image's build, the hot path compiled by mypyc (`make compiled`, {compiled})"
    return note + ("; pgfleet (1 process, pure Python) ran from the sources" if ran_sources else "")


def pgfleet_processes(workers: int, one_too: bool) -> str:
    """What the pgfleet targets run as, for the report header."""
    if workers == 1:
        return "`workers: 1`, one process"
    text = (
        f"`workers: {workers}`, a supervisor + {workers} worker processes sharing the port (SO_REUSEPORT), "
        f"each with 1/{workers} of every limit"
    )
    return text + ("; pgfleet (1 process) is the same pooler with `workers: 1`" if one_too else "")


if __name__ == "__main__":
    sys.exit(main())
