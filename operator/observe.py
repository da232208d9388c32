"""Measuring the database: is it reachable, how big is it, how many backends does the fleet's role hold.

`DatabaseProbe` is the seam: the operator calls a probe with a `DatabaseTarget`; the real
one connects with asyncpg, tests may pass another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    host: str
    port: int
    dbname: str
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    max_connections: int
    backends_in_use: int  # client backends of the target's role on the target's database


class DatabaseUnreachable(Exception):
    """The database could not be reached or refused the credentials; the message says which."""


class DatabaseProbe(Protocol):
    async def __call__(self, target: DatabaseTarget) -> DatabaseFacts: ...


_FACTS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
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
            await conn.close(timeout=self.timeout)
        assert row is not None  # one row by construction of the query
        return DatabaseFacts(max_connections=int(row["max_connections"]), backends_in_use=int(row["in_use"]))
