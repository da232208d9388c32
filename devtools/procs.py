"""Processes the demo, the benchmarks and the tests start: poolers, and what /proc says about them.

A pooler is started from a config dict whose keys are PgBouncer's setting names (the
schema of `pgfleet.pooler.config.PoolerConfig`), so the same dict starts pgfleet
(written as YAML) or PgBouncer (rendered as INI). Each started pooler is a
`PoolerProcess`: its pid, address, log file, and `stop()`.

CPU and memory come from /proc: `cpu_seconds(pid)` is utime+stime of the process and
its descendants, `rss_kib(pid)` their resident set. Linux only.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pgfleet.pooler.userlist import dump_userlist

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ToolMissing(RuntimeError):
    """A program the caller needs (pooler, PgBouncer, pgbench) is not installed or not runnable."""


class ProcessFailed(RuntimeError):
    """A started process exited or never became ready; the message carries its log's tail."""


# -- /proc -------------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, so fields[0] is the state, [1] the ppid,
    [11]/[12] utime/stime and [13]/[14] cutime/cstime; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name before them is in parentheses and may hold spaces.
    return stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every living process below it (by parent pid), `pid` first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_ticks(pid: int, *, reaped: bool = False) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once it is gone.
    With `reaped`, also the cutime + cstime of the children it has waited for."""
    fields = stat_fields(pid)
    if fields is None:
        return 0
    ticks = int(fields[11]) + int(fields[12])
    return ticks + int(fields[13]) + int(fields[14]) if reaped else ticks


def cpu_seconds(pid: int, *, tree: bool = True, reaped: bool = False) -> float:
    """CPU time (user + system) used so far by `pid`, with its living descendants if `tree`,
    and (`reaped`) the children it has already waited for, e.g. a -C storm's backends."""
    pids = descendants(pid) if tree else [pid]
    return (cpu_ticks(pid, reaped=reaped) + sum(cpu_ticks(p) for p in pids[1:])) / CLK_TCK


def rss_kib(pid: int, *, tree: bool = True) -> int:
    """Resident set size (VmRSS) in KiB of `pid`, with its living descendants if `tree`."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by what it spawns) to `wanted` if possible.

    The soft limit goes up to the hard limit; as root the hard limit goes up too (up to
    fs.nr_open). Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        try:
            ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            ceiling = wanted
        new_hard = min(wanted, ceiling)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new_hard), new_hard))
            soft, hard = new_hard, new_hard
        except (OSError, ValueError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- ports -------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- started processes -------------------------------------------------------------------


@dataclass
class PoolerProcess:
    """A pooler (or any server) process we started, listening on host:port."""

    name: str
    popen: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    log_path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the port accepts connections; raise `ProcessFailed` if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessFailed(
                    f"{self.name} exited with code {self.popen.returncode} before listening on "
                    f"{self.host}:{self.port}\n{self.log_tail()}"
                )
            if port_open(self.host, self.port, timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise ProcessFailed(
            f"{self.name} did not listen on {self.host}:{self.port} within {timeout}s\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL after `timeout`; returns the exit code (None if it could not be reaped)."""
        return stop_process(self.popen, timeout)

    def __enter__(self) -> PoolerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(popen: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGINT) -> int | None:
    """Stop a child we started: `sig`, then SIGKILL of its process group after `timeout`."""
    if popen.poll() is not None:
        return popen.returncode
    try:
        popen.send_signal(sig)
        return popen.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return popen.poll()
    try:
        os.killpg(popen.pid, signal.SIGKILL)  # started with start_new_session: its own group
    except (ProcessLookupError, PermissionError):
        popen.kill()
    try:
        return popen.wait(5)
    except subprocess.TimeoutExpired:
        return None


def spawn(
    name: str,
    argv: Sequence[str],
    host: str,
    port: int,
    workdir: Path,
    config: Mapping[str, Any],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> PoolerProcess:
    """Start `argv` in its own session with output to workdir/<name>.log and wait for host:port.

    `wrapper` goes before argv: a program that runs it (e.g. valgrind and its options)."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [*wrapper, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=dict(env) if env is not None else None,
            user=user,
            group=_primary_group(user) if user else None,
            extra_groups=[] if user else None,
            start_new_session=True,  # a terminal's ^C reaches us, and we stop it in order
        )
    proc = PoolerProcess(name, popen, host, port, workdir, log_path, dict(config))
    proc.wait_ready(ready_timeout)
    return proc


def _primary_group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


# -- pgfleet -----------------------------------------------------------------------------


def pgfleet_available() -> bool:
    """True when the pooler's entry point (`pgfleet.pooler.cli`) is importable."""
    try:
        return importlib.util.find_spec("pgfleet.pooler.cli") is not None
    except ImportError:
        return False


def pgfleet_command() -> list[str]:
    """argv prefix that runs the pooler with this interpreter's installation."""
    if importlib.util.find_spec("pgfleet.pooler.__main__") is not None:
        return [sys.executable, "-m", "pgfleet.pooler"]
    script = Path(sys.executable).parent / "pgfleet-pooler"
    if script.exists():
        return [str(script)]
    found = shutil.which("pgfleet-pooler")
    if found:
        return [found]
    raise ToolMissing("the pgfleet pooler is not installed: run `make venv` (pip install -e .)")


def transaction_pool_config(
    host: str, port: int, dbname: str, *, listen_port: int, pool_size: int, max_clients: int
) -> dict[str, Any]:
    """A pooler config with PgBouncer's setting names (both poolers read it): transaction
    mode, trust, `dbname` on host:port, connection logging off (a storm would otherwise
    be a benchmark of the log)."""
    return {
        "listen_addr": "127.0.0.1",
        "listen_port": listen_port,
        "auth_type": "trust",
        "pool_mode": "transaction",
        "max_client_conn": max_clients,
        "default_pool_size": pool_size,
        "log_connections": False,
        "log_disconnections": False,
        "databases": {dbname: {"host": host, "port": port, "dbname": dbname}},
    }


def start_pgfleet(
    config: Mapping[str, Any],
    workdir: Path,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> PoolerProcess:
    """Write `config` as workdir/pgfleet.yaml, run `pgfleet-pooler --config` on it, wait for its port.

    `extra_args` go after the config (e.g. `--no-uvloop`); `env` replaces the environment
    (e.g. a PYTHONPATH naming the compiled build). Use the result as a context manager to
    stop the pooler on the way out.
    """
    if not pgfleet_available():
        raise ToolMissing("the pgfleet pooler cannot run here: `pgfleet.pooler.cli` is not importable")
    path = workdir / "pgfleet.yaml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    host = str(config.get("listen_addr", "127.0.0.1"))
    port = int(config.get("listen_port", 6432))
    argv = [*pgfleet_command(), "--config", str(path), *extra_args]
    return spawn("pgfleet", argv, host, port, workdir, config, env=env, ready_timeout=ready_timeout, wrapper=wrapper)


# -- PgBouncer ---------------------------------------------------------------------------


def pgbouncer_path() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


def _ini_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def pgbouncer_ini(config: Mapping[str, Any], auth_file: str | None = None) -> str:
    """Render a pgfleet-style config dict (PgBouncer's key names, `databases:` map) as PgBouncer INI.

    `auth_file` replaces the config's own (PgBouncer needs one even for `trust`).
    """
    lines = ["[databases]"]
    for name, db in dict(config.get("databases", {})).items():
        lines.append(f"{name} = " + " ".join(f"{k}={_ini_value(v)}" for k, v in dict(db).items()))
    lines += ["", "[pgbouncer]"]
    settings = {k: v for k, v in config.items() if k not in ("databases", "users")}
    if auth_file is not None:
        settings["auth_file"] = auth_file
    settings.setdefault("unix_socket_dir", "")  # TCP only unless asked
    for key, value in settings.items():
        lines.append(f"{key} = {_ini_value(value)}")
    users = dict(config.get("users", {}))
    if users:
        lines += ["", "[users]"]
        lines += [f"{u} = " + " ".join(f"{k}={_ini_value(v)}" for k, v in dict(s).items()) for u, s in users.items()]
    return "\n".join(lines) + "\n"


def start_pgbouncer(
    config: Mapping[str, Any],
    workdir: Path,
    *,
    users: Mapping[str, str] | None = None,
    ready_timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> PoolerProcess:
    """Run PgBouncer with `config` rendered as INI in workdir; wait for its port.

    `users` (name → secret) becomes its userlist when the config names no auth_file
    (PgBouncer wants every user listed, even under `trust`; default: postgres). PgBouncer
    refuses to run as root, so as root it runs as the `postgres` user, which then owns
    `workdir`.
    """
    exe = pgbouncer_path()
    if exe is None:
        raise ToolMissing("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    auth_file = None
    if "auth_file" not in config:
        auth_file = str(workdir / "userlist.txt")
        Path(auth_file).write_text(dump_userlist(users or {"postgres": ""}))
    ini = workdir / "pgbouncer.ini"
    ini.write_text(pgbouncer_ini(config, auth_file))
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        uid = pwd.getpwnam(run_as).pw_uid
        gid = _primary_group(run_as)
        for path in [workdir, *workdir.iterdir()]:
            os.chown(path, uid, gid)
    host = str(config.get("listen_addr", "127.0.0.1"))
    port = int(config.get("listen_port", 6432))
    argv = [exe, str(ini)]
    return spawn(
        "pgbouncer", argv, host, port, workdir, config, user=run_as, ready_timeout=ready_timeout, wrapper=wrapper
    )


def _tcp_sockets() -> Iterator[tuple[int, str]]:
    """(local port, state in hex) of every TCP socket in this network namespace."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            # parts[1] is the local "ADDR:PORT" in hex, parts[3] the state.
            yield int(parts[1].rsplit(":", 1)[1], 16), parts[3]


def established_connections(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is `port` (a server's accepted clients)."""
    return sum(1 for local, state in _tcp_sockets() if state == "01" and local == port)


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT. Tens of thousands of them (after connection storms) slow down connect()."""
    return sum(1 for _, state in _tcp_sockets() if state == "06")
