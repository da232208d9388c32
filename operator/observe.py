"""Measuring the database: is it reachable, how big is it, how many backends does the fleet's role hold.

`DatabaseProbe` is the seam: the operator calls a probe with a `DatabaseTarget`; the real
one connects with asyncpg, tests may pass another.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .allocate import ServerFacts


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    host: str
    port: int
    dbname: str
    user: str
    password: str = field(repr=False)
    # The PgPool's TLS towards the database (spec.tls), so that the operator reaches a
    # database that refuses the clear exactly as its poolers do: libpq's sslmode, the CA
    # the server's certificate must chain to and a client certificate, as PEM text.
    sslmode: str = "prefer"
    ca: str | None = field(default=None, repr=False)
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    max_connections: int
    backends_in_use: int  # client backends of the target's role on the target's database
    usable: int | None = None  # max_connections - superuser_reserved_connections - reserved_connections


class DatabaseUnreachable(Exception):
    """The database could not be reached or refused the credentials; the message says which."""


class DatabaseProbe(Protocol):
    async def __call__(self, target: DatabaseTarget) -> DatabaseFacts: ...


class TlsSettingsError(DatabaseUnreachable):
    """The TLS settings cannot be used (a CA that is no PEM, a key that does not fit)."""


def ssl_for(target: DatabaseTarget) -> ssl.SSLContext | str | bool:
    """asyncpg's `ssl` argument for the target, with libpq's meaning of each sslmode.

    disable: the clear. allow and prefer without a client certificate: asyncpg's own modes
    (TLS when the server offers it, else the clear). Otherwise a context that demands TLS:
    require checks nothing, verify-ca the chain (the CA given, else the system's), and
    verify-full also the host name. A client certificate with allow/prefer demands TLS too:
    a database that asks for one offers TLS.
    """
    mode = target.sslmode
    if mode == "disable":
        return False
    has_cert = bool(target.cert and target.key)
    if mode in ("allow", "prefer") and not has_cert:
        return mode
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verifies = mode in ("verify-ca", "verify-full")
    ctx.check_hostname = mode == "verify-full"
    try:
        if not verifies:
            ctx.verify_mode = ssl.CERT_NONE
        elif target.ca:
            ctx.load_verify_locations(cadata=target.ca)
        else:
            ctx.load_default_certs()
        if has_cert:
            _load_client_certificate(ctx, str(target.cert), str(target.key))
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise TlsSettingsError(f"{target.host}:{target.port}: TLS settings: {exc}") from exc
    return ctx


def _load_client_certificate(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    # OpenSSL reads key pairs from files only: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="pgfleet-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
        for path, text in ((cert_path, cert), (key_path, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(text)
        ctx.load_cert_chain(cert_path, key_path, password=lambda: "")


_FACTS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
         - coalesce(current_setting('reserved_connections', true), '0')::int AS usable,
       (SELECT count(*) FROM pg_stat_activity
         WHERE usename = current_user AND datname = current_database()
           AND backend_type = 'client backend' AND pid <> pg_backend_pid())::int AS in_use
"""


@dataclass(frozen=True, slots=True)
class AsyncpgProbe:
    timeout: float = 5.0

    async def __call__(self, target: DatabaseTarget) -> DatabaseFacts:
        import asyncpg  # the operator extra; the pure layers never need it

        try:
            conn = await asyncpg.connect(
                host=target.host,
                port=target.port,
                database=target.dbname,
                user=target.user,
                password=target.password,
                ssl=ssl_for(target),
                timeout=self.timeout,
                server_settings={"application_name": "pgfleet-operator"},
            )
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseUnreachable(f"{target.host}:{target.port}/{target.dbname}: {exc}") from exc
        try:
            row = await conn.fetchrow(_FACTS_SQL, timeout=self.timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnreachable(f"{target.host}:{target.port}/{target.dbname}: {exc}") from exc
        finally:
            await _close(conn, self.timeout)
        assert row is not None  # one row by construction of the query
        return DatabaseFacts(
            max_connections=int(row["max_connections"]), backends_in_use=int(row["in_use"]), usable=int(row["usable"])
        )


# -- the budget loop's observer: one kept connection per server -------------------------------------

_SETTINGS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
       pg_backend_pid() AS me
"""
# Every client backend, whoever it belongs to: the fleets' are told apart by PID. A role
# without pg_read_all_stats (pg_monitor) sees NULL as the backend_type of others' sessions;
# those on a database are client backends too (background processes have no database).
_BACKENDS_SQL = """
SELECT pid, coalesce(usename, '') AS usename, coalesce(datname, '') AS datname, coalesce(state, '') AS state
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' OR (backend_type IS NULL AND datname IS NOT NULL)
"""
_LIMITS_SQL = """
SELECT 'role' AS kind, rolname AS name, rolconnlimit AS lim FROM pg_roles WHERE rolname = ANY($1::text[])
UNION ALL
SELECT 'database', datname, datconnlimit FROM pg_database WHERE datname = ANY($2::text[])
"""


@dataclass(frozen=True, slots=True)
class Backend:
    pid: int
    user: str
    database: str
    state: str


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """One look at a server: its settings, the limits of some roles and databases, every client backend."""

    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections; 0 before PostgreSQL 16, where it does not exist
    observer_pid: int
    backends: tuple[Backend, ...]
    role_limits: dict[str, int]
    database_limits: dict[str, int]

    def facts(self, fleet_pids: set[int]) -> ServerFacts:
        """The allocator's view: whatever is not a fleet's (by PID) nor the observer is others'."""
        others = [b for b in self.backends if b.pid not in fleet_pids and b.pid != self.observer_pid]
        by_role: dict[str, int] = {}
        by_database: dict[str, int] = {}
        for backend in others:
            by_role[backend.user] = by_role.get(backend.user, 0) + 1
            by_database[backend.database] = by_database.get(backend.database, 0) + 1
        return ServerFacts(
            max_connections=self.max_connections,
            superuser_reserved=self.superuser_reserved,
            reserved=self.reserved,
            others=len(others),
            observer=1,
            role_limits=self.role_limits,
            database_limits=self.database_limits,
            others_by_role=by_role,
            others_by_database=by_database,
        )

    def held_by(self, pids: set[int]) -> int:
        """How many of `pids` are live backends on the server now."""
        return sum(1 for b in self.backends if b.pid in pids)


class ServerObserver:
    """Looks at one PostgreSQL server over a connection it keeps open.

    Kept, because a server that others have filled up would refuse a new one exactly
    when the observation matters most. Lost (server restart, network), it is opened
    again at the next look; until then `snapshot` raises DatabaseUnreachable.
    """

    def __init__(self, dsn: str | None = None, *, target: DatabaseTarget | None = None, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.target = target
        self.timeout = timeout
        self._conn: Any = None
        self._stale = False

    def retarget(self, target: DatabaseTarget) -> None:
        """Other credentials or TLS settings: the kept connection is replaced at the next look."""
        if target != self.target:
            self.target = target
            self._stale = True

    async def _connection(self) -> Any:
        import asyncpg

        if self._stale:
            self._stale = False
            await self.close()
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        kwargs: dict[str, Any] = {
            "timeout": self.timeout,
            "server_settings": {"application_name": "pgfleet-budget"},
            "statement_cache_size": 0,
        }
        if self.target is not None:
            kwargs.update(
                host=self.target.host,
                port=self.target.port,
                database=self.target.dbname,
                user=self.target.user,
                password=self.target.password,
                ssl=ssl_for(self.target),
            )
        self._conn = await asyncpg.connect(self.dsn, **kwargs)
        return self._conn

    async def snapshot(self, roles: Sequence[str] = (), databases: Sequence[str] = ()) -> ServerSnapshot:
        import asyncpg

        where = self.dsn or (f"{self.target.host}:{self.target.port}" if self.target else "?")
        try:
            conn = await self._connection()
            settings = await conn.fetchrow(_SETTINGS_SQL, timeout=self.timeout)
            rows = await conn.fetch(_BACKENDS_SQL, timeout=self.timeout)
            limit_rows = await conn.fetch(_LIMITS_SQL, list(roles), list(databases), timeout=self.timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            raise DatabaseUnreachable(f"{_redact(where)}: {exc}") from exc
        assert settings is not None
        return ServerSnapshot(
            max_connections=int(settings["max_connections"]),
            superuser_reserved=int(settings["superuser_reserved"]),
            reserved=int(settings["reserved"]),
            observer_pid=int(settings["me"]),
            backends=tuple(Backend(int(r["pid"]), r["usename"], r["datname"], r["state"]) for r in rows),
            role_limits={r["name"]: int(r["lim"]) for r in limit_rows if r["kind"] == "role"},
            database_limits={r["name"]: int(r["lim"]) for r in limit_rows if r["kind"] == "database"},
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn, self.timeout)


async def _close(conn: Any, timeout: float) -> None:
    """Close politely, else at once: a connection left mid-query (a look cancelled at shutdown, a
    database gone) cannot say goodbye, and one never closed lingers until the collector finds it."""
    try:
        await conn.close(timeout=timeout)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:
        conn.terminate()


def _redact(dsn: str) -> str:
    """A DSN without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
