"""The cost of one login: a `pgbench -S -C` storm through pooler variants, CPU per login.

    make compiled && .venv/bin/python -P benchmarks/login.py \\
        --variant before=/tmp/old-compiled --variant after=build/compiled \\
        --auth trust,scram --log-connections off,on --rounds 3 --out benchmarks/results/NAME.md

Each variant is a pgfleet build (a directory put on PYTHONPATH: a `make compiled` tree,
or `sources` for this checkout's editable install) or `pgbouncer`. Every variant runs in
front of one throwaway PostgreSQL with each client authentication (`trust`, or `scram`:
SCRAM-SHA-256 against a SCRAM verifier in auth_file, as copied from pg_authid) and each
`log_connections` setting asked for; one pooler per combination stays up for the whole
run, and the combinations take turns round after round, so that drift on a shared machine
hits them alike. Under `-C` every transaction is one login (connect, startup, auth, the
welcome, one SELECT, Terminate), so the pooler's user+system CPU over a run divided by
pgbench's transactions is its CPU per login, a figure that does not depend on how the
machine's cores were shared.

`--py-spy DIR` records each pgfleet combination with py-spy (`--native`, so that the
mypyc-compiled functions show by name) during one extra run and writes the flat profile
(self and total samples per function) beside a collapsed-stack file.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgfleet.devtools.pgbench import PgbenchArgs, pgbench_init, run_pgbench
from pgfleet.devtools.procs import (
    CLK_TCK,
    PoolerProcess,
    free_port,
    pgbouncer_path,
    raise_nofile,
    spawn,
    start_pgbouncer,
    start_pgfleet,
    stat_fields,
    time_wait_sockets,
    transaction_pool_config,
)
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.pooler.userlist import dump_userlist

ROOT = Path(__file__).resolve().parent.parent
DB = "bench"
USER = "postgres"  # trusted by the throwaway PostgreSQL: only the client leg authenticates
PASSWORD = "storm-password"
TIME_WAIT_CALM = 2_000


def scram_secret(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL would store (4096 iterations, its default, and a 16-byte salt)."""
    # By hand (RFC 5802's derivation) rather than scramp's make_auth_info, which refuses fewer than 4096.
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


@dataclass
class Combo:
    variant: str  # a label
    build: str  # a PYTHONPATH directory, "sources", or "pgbouncer"
    auth: str  # trust | scram
    log_connections: bool
    proc: PoolerProcess | None = None
    tps: list[float] = field(default_factory=list)
    logins: int = 0
    cpu: float = 0.0
    sys_cpu: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.variant} {self.auth} log_connections={'on' if self.log_connections else 'off'}"

    def us_per_login(self) -> float | None:
        return self.cpu * 1e6 / self.logins if self.logins else None

    def sys_us_per_login(self) -> float | None:
        return self.sys_cpu * 1e6 / self.logins if self.logins else None


def user_sys_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of one process (a pooler of one process: pgfleet `workers: 1`, PgBouncer)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def start_combo(
    combo: Combo,
    pg: TempPostgres,
    workroot: Path,
    secret: str,
    wrapper: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> PoolerProcess:
    """The combination's pooler in front of `pg`; `wrapper` runs it (instructions.py: valgrind)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{combo.variant}-", dir=workroot))
    workdir.chmod(0o755)
    config: dict[str, Any] = transaction_pool_config(
        pg.host, pg.port, DB, listen_port=free_port(), pool_size=20, max_clients=2_000
    )
    config["log_connections"] = config["log_disconnections"] = combo.log_connections
    if combo.auth == "scram":
        config["auth_type"] = "scram-sha-256"
        auth_file = workdir / "userlist.txt"
        auth_file.write_text(dump_userlist({USER: secret}))
        config["auth_file"] = str(auth_file)
    if combo.build == "pgbouncer":
        return start_pgbouncer(config, workdir, ready_timeout=ready_timeout, wrapper=wrapper)
    if combo.build == "floor":
        port = int(config["listen_port"])
        argv = [sys.executable, "-P", str(ROOT / "benchmarks" / "loginfloor.py"), "--port", str(port)]
        return spawn("floor", argv, "127.0.0.1", port, workdir, config, ready_timeout=ready_timeout, wrapper=wrapper)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if combo.build != "sources":
        env["PYTHONPATH"] = str(Path(combo.build).resolve())
    config["workers"] = 1
    return start_pgfleet(config, workdir, env=env, ready_timeout=ready_timeout, wrapper=wrapper)


def settle_time_wait(max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while time_wait_sockets() >= TIME_WAIT_CALM and time.monotonic() < deadline:
        time.sleep(1.0)


def storm(combo: Combo, args: PgbenchArgs, record: Callable[[int], None] | None = None) -> None:
    assert combo.proc is not None
    settle_time_wait(max(10.0, args.duration))
    pid = combo.proc.pid
    user_before, sys_before = user_sys_seconds(pid)
    password = PASSWORD if combo.auth == "scram" else None
    if record is not None:
        record(pid)
    result = run_pgbench(combo.proc.host, combo.proc.port, DB, args, user=USER, password=password)
    user_after, sys_after = user_sys_seconds(pid)
    if not result.ok:
        combo.errors.append(result.error or "pgbench failed")
        return
    combo.tps.append(result.tps or 0.0)
    combo.logins += result.transactions
    combo.cpu += user_after - user_before + sys_after - sys_before
    combo.sys_cpu += sys_after - sys_before


def py_spy_recorder(out: Path, duration: float) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Start py-spy on a pid for `duration` seconds (in the background); a function to wait for it."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs: list[subprocess.Popen[bytes]] = []

    def record(pid: int) -> None:
        argv = [exe, "record", "--native", "-r", "250", "-d", str(int(duration)), "-f", "raw", "-o", str(out)]
        procs.append(subprocess.Popen([*argv, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait() -> None:
        for proc in procs:
            proc.wait(timeout=duration + 60)

    return record, wait


# A login's phases, by the pooler functions a sample is in (the innermost that matches
# wins); both spellings, the sources' (Class.method) and mypyc's (CPyDef_module___Class___method).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("auth: SCRAM", ("authenticate_scram", "ScramServerExchange", "scram_verifier", "learned", "sasl_initial_response")),
    ("auth", ("_authenticate", "_auth_begin", "_auth_step", "_password_inline", "_hba_method", "_read_password", "check_md5", "check_plain")),
    ("startup packet", ("parse_startup_packet", "_read_startup_packet", "_check_startup_params", "StartupReader", "_begin_login", "_startup_of")),
    (
        "welcome (params, key, frames)",
        ("welcome_frames", "welcome_params", "register_cancel_key", "client_logged_in", "client_refused", "reported_value", "get_pool",
         "_welcome", "_login_pool", "client_welcome", "_logged_in_inline"),
    ),
    ("first query: reply, server back", ("ServerConnection", "server_ready", "_release", "Pool___release", "Pool.release")),
    ("first query: to the server", ("_forward", "___link", ".link", "acquire", "_need_server")),
    ("Terminate, teardown", ("connection_lost", "client_disconnected", "_call_connection_lost", "UVHandle__close", "client_gone",
                             "UVStream__close", "uv_close", "close_handle_cb", "UVHandle__free")),
    ("accept", ("uv__server_io", "connection_made", "ClientConnection_____init__", "ClientConnection.__init__", "client_connected",
                "streamserver_on_listen", "on_listen", "_accept", "accept4", "TCPTransport__new", "TCPTransport_new", "factory")),
    ("login inline (SSLRequest 'N', dispatch)", ("_login_inline",)),
    ("login coroutine (task, timeout, SSLRequest 'N', writes)", ("_login", "_run_handshake", "task_step", "_wait_for_data")),
    ("read wake-up (loop to data_received)", ("uv__read", "stream_on_read", "uv__stream_io")),
)  # fmt: skip
SYSCALLS = frozenset(
    ("write", "writev", "read", "accept4", "close", "syscall", "setsockopt", "epoll_ctl", "getpid", "getsockname",
     "getpeername", "shutdown", "getrandom", "sendmsg", "recv", "send")
)  # fmt: skip
IDLE = frozenset(("epoll_pwait", "epoll_wait"))


def phase_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for phase, patterns in PHASES:
            if any(p in frame for p in patterns):
                return phase
    return "event loop, other"


def perf_recorder(out: Path, duration: float, stacks: bool = False) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Start `perf record` (on-CPU samples, user and kernel) on a pid; a function to wait for it.
    `stacks`: with call stacks (DWARF unwinding), for the phases of a login (perf_phases)."""
    procs: list[subprocess.Popen[bytes]] = []

    def record(pid: int) -> None:
        argv = ["perf", "record", "-F", "997", "-o", str(out), "-p", str(pid)]
        if stacks:
            argv += ["--call-graph", "dwarf,16384"]
        argv += ["--", "sleep", str(int(duration))]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait() -> None:
        for proc in procs:
            proc.wait(timeout=duration + 60)

    return record, wait


def perf_profile(data: Path, top: int = 40) -> list[str]:
    """On-CPU shares by shared object (the kernel, libpython, the compiled modules, uvloop...) and by symbol."""
    lines: list[str] = []
    for key, limit in (("dso", 15), ("dso,symbol", top)):
        out = subprocess.run(
            [
                "perf",
                "report",
                "-i",
                str(data),
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--sort",
                key,
                "--percent-limit",
                "0.4",
            ],
            capture_output=True,
            text=True,
        ).stdout
        rows = [line.strip() for line in out.splitlines() if line.strip() and not line.startswith("#")]
        lines += ["```", *rows[:limit], "```", ""]
    return lines


def perf_phases(data: Path, logins: int, cpu_seconds: float) -> list[str]:
    """A login's phases from perf's on-CPU samples with call stacks: each sample goes to the
    innermost pooler or event-loop function of its stack that names a phase (PHASES), its
    kernel part (the system calls under it, their wake-ups) kept apart; µs per login are
    the phase's share of the pooler's CPU over the run times CPU per login."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso", "--no-inline"], capture_output=True, text=True
    ).stdout
    phases: collections.Counter[str] = collections.Counter()
    kernel: collections.Counter[str] = collections.Counter()
    samples = 0
    for block in out.split("\n\n"):
        frames = [line.strip() for line in block.splitlines() if line.strip()]
        if not frames:
            continue
        samples += 1
        names = [frame.split(" ", 1)[1] if " " in frame else frame for frame in frames]  # leaf first
        phase = phase_of(names[::-1])
        phases[phase] += 1
        if "kernel.kallsyms" in names[0] or "[unknown]" in names[0]:
            kernel[phase] += 1
    if not samples:
        return ["no samples"]
    per_login = cpu_seconds * 1e6 / logins if logins else 0.0
    lines = [f"{samples} on-CPU samples; {per_login:.1f} µs of pooler CPU per login over this run", ""]
    lines += ["| phase | % of samples | µs per login | of which in the kernel |", "|---|---|---|---|"]
    for phase, count in phases.most_common():
        share = count / samples
        lines.append(
            f"| {phase} | {100 * share:.1f} | {share * per_login:.1f} | {kernel[phase] / samples * per_login:.1f} |"
        )
    return lines


def flat_profile(collapsed: Path, top: int = 30) -> list[str]:
    """A login's phases, then self and total samples per function, from py-spy's collapsed
    stacks; samples idle in epoll_wait are left out (py-spy samples wall time)."""
    self_count: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    phase_sys: collections.Counter[str] = collections.Counter()
    samples = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        if frames[-1] in IDLE:
            idle += count
            continue
        samples += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
        phase = phase_of(frames)
        phases[phase] += count
        if frames[-1] in SYSCALLS:
            phase_sys[phase] += count
    if not samples:
        return ["no busy samples"]
    in_sys = sum(phase_sys.values())
    outside = samples - in_sys
    lines = [f"{samples} busy samples ({idle} idle in epoll_wait left out, {in_sys} in system calls)", ""]
    lines.append(
        "py-spy samples wall time: a sample in a system call counts the call's whole duration, "
        "preemption included, so the last column (samples outside system calls) is the better "
        "picture of the user CPU."
    )
    lines += ["", "| phase | % of busy samples | of which in syscalls | % of samples outside syscalls |"]
    lines.append("|---|---|---|---|")
    for phase, count in phases.most_common():
        user = count - phase_sys[phase]
        lines.append(
            f"| {phase} | {100 * count / samples:.1f} | {100 * phase_sys[phase] / samples:.1f} | "
            f"{100 * user / outside if outside else 0:.1f} |"
        )
    lines.append(f"| (all) | 100 | {100 * in_sys / samples:.1f} | 100 |")
    lines += ["", "| function (by self) | self % |", "|---|---|"]
    for name, count in self_count.most_common(top):
        lines.append(f"| `{name}` | {100 * count / samples:.1f} |")
    return lines


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pooler CPU per login under a pgbench -C storm")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL=PATH (a compiled tree, or `sources`), `pgbouncer`, or `floor` (loginfloor.py: canned "
        "answers on uvloop, the least a Python server pays per login; trust only); repeat "
        "(default: compiled=build/compiled)",
    )
    parser.add_argument("--auth", default="trust,scram", help="client auth: trust, scram (comma-separated)")
    parser.add_argument("--log-connections", default="off", help="off, on (comma-separated)")
    parser.add_argument(
        "--scram-iterations",
        type=int,
        default=4096,
        help="iterations of the SCRAM verifier (PostgreSQL's default 4096); each SCRAM login costs pgbench a "
        "PBKDF2 of this many rounds on the same cores, so a low count (PostgreSQL 16's scram_iterations "
        "allows 1) lets the storm measure the pooler rather than pgbench",
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, help="directory for a py-spy profile of each pgfleet combination")
    parser.add_argument("--perf", type=Path, help="directory for a perf profile (on-CPU) of each pgfleet combination")
    parser.add_argument(
        "--perf-stacks",
        action="store_true",
        help="with --perf: record call stacks too and break the pooler's CPU per login into a login's phases",
    )
    parser.add_argument("--out", type=Path, help="markdown report (default: stdout only)")
    opts = parser.parse_args(argv)

    variants: list[tuple[str, str]] = []
    for spec in opts.variant or [f"compiled={ROOT / 'build' / 'compiled'}"]:
        if spec == "pgbouncer":
            if pgbouncer_path() is None:
                parser.error("pgbouncer is not installed")
            variants.append(("pgbouncer", "pgbouncer"))
        elif spec == "floor":
            variants.append(("floor", "floor"))
        else:
            label, _, path = spec.partition("=")
            variants.append((label, path or "sources"))
    auths = [a.strip() for a in opts.auth.split(",") if a.strip()]
    logs = [v.strip() == "on" for v in opts.log_connections.split(",") if v.strip()]
    combos = [
        Combo(label, build, auth, log)
        for label, build in variants
        for auth in auths
        for log in logs
        if build != "floor" or (auth == "trust" and not log)  # canned answers: no password, no log
    ]
    args = PgbenchArgs(clients=opts.clients, jobs=2, duration=opts.duration, mode="simple", connect=True)

    raise_nofile(10_000)
    workroot = Path(tempfile.mkdtemp(prefix="pgfleet-login-"))
    workroot.chmod(0o755)
    pg: TempPostgres | None = None
    started = time.monotonic()
    profiles: dict[str, list[str]] = {}
    try:
        pg = TempPostgres(max_connections=200).start()
        pg.sql(f"CREATE DATABASE {DB}")
        pgbench_init(pg.host, pg.port, DB, scale=1)
        secret = scram_secret(PASSWORD, opts.scram_iterations)
        for combo in combos:
            combo.proc = start_combo(combo, pg, workroot, secret)
            warm = PgbenchArgs(clients=opts.clients, jobs=2, duration=1, mode="simple", connect=True)
            run_pgbench(combo.proc.host, combo.proc.port, DB, warm, user=USER, password=PASSWORD)
        for rnd in range(opts.rounds):
            shift = rnd % len(combos)
            for combo in combos[shift:] + combos[:shift]:
                storm(combo, args)
                per = combo.us_per_login()
                print(f"round {rnd + 1}/{opts.rounds} {combo.name}: {combo.tps[-1] if combo.tps else 0:,.0f} tps, "
                      f"{per or 0:.0f} µs/login so far", flush=True)  # fmt: skip
        if opts.py_spy is not None:
            opts.py_spy.mkdir(parents=True, exist_ok=True)
            for combo in combos:
                if combo.build == "pgbouncer":
                    continue
                slug = combo.name.replace(" ", "_").replace("=", "-")
                out = opts.py_spy / f"{slug}.txt"
                record, wait = py_spy_recorder(out, opts.duration)
                storm(Combo(combo.variant, combo.build, combo.auth, combo.log_connections, combo.proc), args, record)
                wait()
                if out.exists():
                    profiles[combo.name] = flat_profile(out)
                    (opts.py_spy / f"{slug}.md").write_text("\n".join(profiles[combo.name]) + "\n")
        if opts.perf is not None:
            opts.perf.mkdir(parents=True, exist_ok=True)
            for combo in combos:
                slug = combo.name.replace(" ", "_").replace("=", "-")
                data = opts.perf / f"{slug}.data"
                record, wait = perf_recorder(data, opts.duration, opts.perf_stacks and combo.build != "pgbouncer")
                run = Combo(combo.variant, combo.build, combo.auth, combo.log_connections, combo.proc)
                storm(run, args, record)
                wait()
                if data.exists():
                    profiles[f"perf: {combo.name}"] = perf_profile(data)
                    if opts.perf_stacks and combo.build != "pgbouncer":
                        profiles[f"perf phases: {combo.name}"] = perf_phases(data, run.logins, run.cpu)
    finally:
        for combo in combos:
            if combo.proc is not None:
                combo.proc.stop()
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(workroot, ignore_errors=True)

    lines = [f"# CPU per login, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", ""]
    lines.append(
        f"`pgbench -S -C -c {opts.clients} -j 2 -T {opts.duration:g}`, {opts.rounds} rounds, combinations taking "
        f"turns; {time.monotonic() - started:.0f} s. CPU is the pooler's user+system time over the runs divided by "
        "the logins (transactions) pgbench completed."
        + (f" SCRAM verifier of {opts.scram_iterations} iterations." if "scram" in auths else "")
    )
    lines += ["", "| variant | auth | log_connections | tps (mean) | spread | pooler CPU µs/login | of which system |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for combo in combos:
        mean = statistics.fmean(combo.tps) if combo.tps else None
        spread = (max(combo.tps) - min(combo.tps)) / mean * 50 if mean and len(combo.tps) > 1 else None
        per = combo.us_per_login()
        lines.append(
            f"| {combo.variant} | {combo.auth} | {'on' if combo.log_connections else 'off'} | "
            f"{'—' if mean is None else f'{mean:,.0f}'} | {'—' if spread is None else f'±{spread:.0f}%'} | "
            f"{'—' if per is None else f'{per:.1f}'} | {fmt(combo.sys_us_per_login())} |"
            + (f" errors: {combo.errors[0]}" if combo.errors else "")
        )
    for name, table in profiles.items():
        lines += ["", f"## {name if name.startswith('perf') else 'py-spy: ' + name}", "", *table]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if opts.out is not None:
        opts.out.write_text(report)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
