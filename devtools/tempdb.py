"""A throwaway PostgreSQL server for tests, the demo and benchmarks.

initdb in a temporary directory, a free port on 127.0.0.1, its own unix-socket
directory and pg_hba, and users with known passwords for each authentication method.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .procs import free_port

# Users the server is created with, one per authentication method it is reached with
# over TCP. The superuser `postgres` is trusted.
PASSWORDS = {"md5user": "md5pass", "scramuser": "scrampass", "plainuser": "plainpass"}
HBA_METHODS = {"md5user": "md5", "scramuser": "scram-sha-256", "plainuser": "password"}


def find_bindir() -> Path:
    """Directory holding pg_ctl/initdb/postgres: PATH first, then Debian's layout."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: install Debian's `postgresql` package "
        "(apt-get install postgresql) or put pg_ctl on PATH"
    )


@dataclass
class TempPostgres:
    max_connections: int = 100
    port: int = field(default_factory=free_port)
    extra_conf: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    # TLS: (certificate chain, key, CA) PEM texts; the server then runs with ssl = on.
    tls: tuple[bytes, bytes, bytes] | None = None
    # pg_hba.conf lines in place of the default ones (e.g. hostssl only).
    hba: list[str] | None = None

    def __post_init__(self) -> None:
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="pgfleet-pg-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    # -- running commands as the server's owner ---------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _run(self, *args: str) -> str:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc.stdout

    def _ensure_owner(self) -> None:
        if not self._as_postgres:
            return
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        shutil.chown(self.base, "postgres")
        self.base.chmod(0o755)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> TempPostgres:
        self._ensure_owner()
        self._run("mkdir", "-p", str(self.sockdir))
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": "3",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            "log_line_prefix": "'%m [%p] %u@%d '",
            "log_min_messages": "warning",
            **self.extra_conf,
        }
        if self.tls is not None:
            conf.update(self._write_tls(*self.tls))
        conf_text = "".join(f"{k} = {v}\n" for k, v in conf.items())
        hba = ["local all all trust"]
        hba += [f"host all {user} 127.0.0.1/32 {method}" for user, method in HBA_METHODS.items()]
        hba += ["host all all 127.0.0.1/32 trust"]
        if self.hba is not None:
            hba = ["local all all trust", *self.hba]
        self._append(self.datadir / "postgresql.conf", conf_text)
        self._write(self.datadir / "pg_hba.conf", "\n".join(hba) + "\n")
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start"
        )
        self.sql(
            "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN SUPERUSER PASSWORD 'md5pass';"
            "SET password_encryption = 'scram-sha-256';"
            "CREATE ROLE scramuser LOGIN SUPERUSER PASSWORD 'scrampass';"
            "CREATE ROLE plainuser LOGIN SUPERUSER PASSWORD 'plainpass';"
        )
        return self

    def _write_tls(self, cert: bytes, key: bytes, ca: bytes) -> dict[str, str]:
        # Written as the server's owner: PostgreSQL refuses a key others can read.
        names = {
            "ssl_cert_file": ("server.crt", cert),
            "ssl_key_file": ("server.key", key),
            "ssl_ca_file": ("ca.crt", ca),
        }
        for name, text in names.values():
            self._write(self.datadir / name, text.decode())
        self._run("chmod", "600", str(self.datadir / "server.key"))
        return {"ssl": "on", **{setting: f"'{self.datadir / name}'" for setting, (name, _) in names.items()}}

    def _append(self, path: Path, text: str) -> None:
        proc = subprocess.run(self._cmd("tee", "-a", str(path)), input=text, text=True, capture_output=True)
        proc.check_returncode()

    def _write(self, path: Path, text: str) -> None:
        proc = subprocess.run(self._cmd("tee", str(path)), input=text, text=True, capture_output=True)
        proc.check_returncode()

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart_server(self) -> None:
        """Start again after `stop` (same data, same port)."""
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start"
        )

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------
    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; return unaligned output."""
        return self._run(
            str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", statement,
        ).strip()  # fmt: skip

    def client_backends(self, user: str | None = None, dbname: str | None = None) -> int:
        """Client backends as pg_stat_activity counts them (excluding this query's)."""
        where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if user:
            where += f" AND usename = '{user}'"
        if dbname:
            where += f" AND datname = '{dbname}'"
        return int(self.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}"))

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        password = PASSWORDS.get(user)
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
