"""Run pgbench and read its report.

`PgbenchArgs` says what to run (clients, threads, duration, query mode, script,
reconnect per transaction); `run_pgbench` runs it against host:port and returns a
`PgbenchResult` parsed from pgbench's summary. A run that pgbench aborts (a client
error, e.g. `-M prepared` through a pooler that does not track prepared statements)
is a result with `ok=False` and the first error line, never an exception.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .procs import ToolMissing

QUERY_MODES = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class PgbenchArgs:
    """One pgbench run's shape; `argv()` turns it into command-line options."""

    clients: int = 10
    jobs: int = 2
    duration: float = 10.0
    mode: str = "simple"  # -M: simple | extended | prepared
    select_only: bool = True  # -S; False runs the TPC-B-like default script
    connect: bool = False  # -C: a new connection for every transaction
    transactions: int = 0  # -t: this many per client instead of `duration`
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        if self.mode not in QUERY_MODES:
            raise ValueError(f"unknown pgbench query mode {self.mode!r}; expected one of {QUERY_MODES}")
        args = ["-c", str(self.clients), "-j", str(min(self.jobs, self.clients))]
        if self.transactions:
            args += ["-t", str(self.transactions)]
        else:
            args += ["-T", str(max(1, round(self.duration)))]
        args += ["-M", self.mode, "-n"]  # -n: no vacuum before the run (it would not pass a pooler unchanged)
        if self.select_only:
            args.append("-S")
        if self.connect:
            args.append("-C")
        return args + list(self.extra)


@dataclass(frozen=True)
class PgbenchResult:
    """pgbench's summary. `tps` is what pgbench reports: without the initial connection
    time normally, including reconnections under `-C` (then `includes_connections`)."""

    ok: bool
    returncode: int
    tps: float | None = None
    transactions: int = 0
    failed: int = 0
    latency_ms: float | None = None
    connection_ms: float | None = None  # initial (or, under -C, average) connection time
    includes_connections: bool = False
    error: str | None = None
    output: str = field(default="", repr=False)


def pgbench_path() -> str:
    """The pgbench executable; `ToolMissing` with an install hint when absent."""
    found = shutil.which("pgbench")
    if not found:
        raise ToolMissing("pgbench is not installed (Debian: apt-get install postgresql-client)")
    return found


_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1) if match else None


def _first_error(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if "error" in line.lower() or "fatal" in line.lower() or "abort" in line.lower():
            return line.strip()
    stripped = stderr.strip()
    return stripped.splitlines()[-1] if stripped else None


def parse_pgbench(stdout: str, stderr: str = "", returncode: int = 0) -> PgbenchResult:
    """Parse pgbench's (PostgreSQL 13+) summary; ok only if it exited 0 and reported a tps."""
    tps = _search(rf"^tps = {_NUMBER}", stdout)
    transactions = _search(r"^number of transactions actually processed: ([0-9]+)", stdout)
    failed = _search(r"^number of failed transactions: ([0-9]+)", stdout)
    latency = _search(rf"^latency average = {_NUMBER} ms", stdout)
    connection = _search(rf"^(?:initial|average) connection time = {_NUMBER} ms", stdout)
    includes = bool(re.search(r"^tps = .*\(including (?:reconnection times|connections establishing)\)", stdout, re.M))
    ok = returncode == 0 and tps is not None
    error = None
    if not ok:
        error = _first_error(stderr) or f"pgbench exited with code {returncode}"
    return PgbenchResult(
        ok=ok,
        returncode=returncode,
        tps=float(tps) if tps is not None else None,
        transactions=int(transactions) if transactions else 0,
        failed=int(failed) if failed else 0,
        latency_ms=float(latency) if latency else None,
        connection_ms=float(connection) if connection else None,
        includes_connections=includes,
        error=error,
        output=stdout + stderr,
    )


def pgbench_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without libpq variables that would redirect pgbench."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra or {})
    return env


def run_pgbench(
    host: str,
    port: int,
    dbname: str,
    args: PgbenchArgs,
    *,
    user: str = "postgres",
    password: str | None = None,
    timeout: float | None = None,
    sslmode: str | None = None,
) -> PgbenchResult:
    """Run pgbench against host:port/dbname; a run that overstays `timeout` is killed and reported failed.

    `timeout` defaults to the run's duration plus 60 s; `sslmode`: libpq's (default prefer).
    """
    argv = [pgbench_path(), "-h", host, "-p", str(port), "-U", user, *args.argv(), dbname]
    extra = {"PGPASSWORD": password} if password else {}
    if sslmode:
        extra["PGSSLMODE"] = sslmode
    env = pgbench_env(extra)
    limit = timeout if timeout is not None else args.duration + 60
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=limit, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return PgbenchResult(ok=False, returncode=-1, error=f"pgbench did not finish within {limit:.0f}s", output=out)
    return parse_pgbench(proc.stdout, proc.stderr, proc.returncode)


def pgbench_init(
    host: str, port: int, dbname: str, *, scale: int = 1, user: str = "postgres", extra: Sequence[str] = ()
) -> None:
    """`pgbench -i` (quietly); raises RuntimeError with pgbench's output if it fails."""
    argv = [pgbench_path(), "-i", "-q", "-s", str(scale), "-h", host, "-p", str(port), "-U", user, *extra, dbname]
    proc = subprocess.run(argv, capture_output=True, text=True, env=pgbench_env())
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
