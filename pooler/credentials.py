"""Secrets the pooler learns rather than reads from auth_file.

- **auth_query** (PgBouncer's `auth_user`/`auth_query`/`auth_dbname`): a user missing from
  auth_file is looked up in PostgreSQL over a connection of `auth_user`, and the secret
  (an md5 hash or a SCRAM verifier) is kept for `AUTH_CACHE_SECONDS`. Concurrent logins
  of one user share one lookup. Secrets are never logged.
- **SCRAM pass-through** (passthrough.py): the keys of a client's successful SCRAM
  exchange against a verifier log the pool in to PostgreSQL as that user.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from . import auth, tls
from .passthrough import ScramKeys
from .protocol import backend
from .protocol.framing import cstring, frame
from .server import ServerConnection, ServerLoginError, ServerState

if TYPE_CHECKING:
    from .pooler import Pooler

log = logging.getLogger("pgfleet.credentials")

# How long a looked-up secret answers logins before PostgreSQL is asked again: a storm of
# logins costs one query per user, and a changed password is seen within this time.
AUTH_CACHE_SECONDS = 10.0


def lookup_message(sql: str, value: str) -> bytes:
    """Parse/Bind/Execute/Sync of `sql` with one text parameter ($1), unnamed statement."""
    parse = frame(b"P", cstring("") + cstring(sql) + struct.pack("!h", 0))
    encoded = value.encode()
    bind = frame(b"B", cstring("") + cstring("") + struct.pack("!hhi", 0, 1, len(encoded)) + encoded + b"\x00\x00")
    return parse + bind + frame(b"E", cstring("") + struct.pack("!i", 0)) + frame(b"S")


def parse_data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body)
    pos = 2
    out: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length].decode(errors="replace"))
            pos += length
    return out


class Credentials:
    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.lookups = 0  # queries sent to PostgreSQL (the cache's effect, in tests)
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._inflight: dict[str, asyncio.Task[str | None]] = {}
        self._keys: dict[str, ScramKeys] = {}
        self._keys_from: dict[str, str] = {}  # user -> the secret its keys were learned against

    # -- auth_query ----------------------------------------------------------------------------
    async def lookup(self, user: str, database: str) -> str | None:
        """The secret of a user missing from auth_file, from auth_query (None: no such user or no password)."""
        cached = self._cache.get(user)
        if cached is not None and cached[0] > self.pooler.loop.time():
            return cached[1]
        task = self._inflight.get(user)
        if task is None:
            # A task of its own: a client that gives up does not cancel the others' lookup.
            task = self._inflight[user] = self.pooler.loop.create_task(self._query(user, database))
            task.add_done_callback(lambda done: self._looked_up(user, done))
        return await asyncio.shield(task)

    def _looked_up(self, user: str, task: asyncio.Task[str | None]) -> None:
        self._inflight.pop(user, None)
        if not task.cancelled() and task.exception() is None:  # exception() also marks it seen
            self._cache[user] = (self.pooler.loop.time() + AUTH_CACHE_SECONDS, task.result())

    async def _query(self, user: str, database: str) -> str | None:
        pooler = self.pooler
        config = pooler.config
        assert config.auth_user is not None
        auth_database = config.auth_dbname or database
        if config.database(auth_database) is None:
            raise ServerLoginError(f'pgfleet: auth_dbname "{auth_database}" is not in databases')
        pool = pooler.get_pool(auth_database, config.auth_user)
        db = pool.db_config
        server = ServerConnection(pool)
        self.lookups += 1
        try:
            async with asyncio.timeout(config.server_connect_timeout or None):
                if db.unix_socket is not None:
                    await pooler.loop.create_unix_connection(lambda: server, db.unix_socket)
                else:
                    await tls.connect_server(
                        pooler.loop, lambda: server, db.host, db.port, pooler.tls, pooler.tls_stats
                    )
                await server.login(pool.server_user, pool.server_dbname, pool._server_secret())
                messages = await server.exchange(lookup_message(config.auth_query, user))
        except (OSError, TimeoutError) as exc:
            log.warning("auth_query as %s failed: %s", config.auth_user, exc)
            raise ServerLoginError(f"pgfleet: auth_query failed: {exc}") from None
        finally:
            server.state = ServerState.CLOSED  # never the pool's: its counts do not include it
            server.close()
        rows: list[list[str | None]] = []
        for msg_type, body in messages:
            if msg_type == ord("E"):
                fields = backend.parse_error_fields(body)
                log.warning("auth_query as %s failed: %s", config.auth_user, fields.get("M"))
                raise ServerLoginError(f"pgfleet: auth_query failed: {fields.get('M')}")
            if msg_type == ord("D"):
                rows.append(parse_data_row(body))
        if not rows or len(rows[0]) < 2:
            return None
        return rows[0][1]

    # -- SCRAM pass-through --------------------------------------------------------------------
    def learned(self, user: str, secret: str, client_key: bytes) -> None:
        """A client proved itself with SCRAM against `secret`: keep the keys for server logins."""
        if self._keys_from.get(user) == secret:
            return  # learned against this secret already: a proof that checks out gives the same keys
        if auth.is_scram(secret):
            self._keys[user] = ScramKeys.learned(auth.parse_scram_secret(secret), client_key)
            self._keys_from[user] = secret

    def server_secret(self, user: str) -> str | ScramKeys | None:
        """What the pool logs in to PostgreSQL with as `user`: auth_file's secret, else the one
        auth_query found; a SCRAM verifier is replaced by the keys learned against it."""
        secret = self.pooler.userlist.get(user)
        if secret is None:
            cached = self._cache.get(user)
            secret = cached[1] if cached is not None else None
        if secret is not None and auth.is_scram(secret):
            keys = self._keys.get(user)
            if keys is not None and keys.fits(auth.parse_scram_secret(secret)):
                return keys
        return secret

    def forget(self) -> None:
        """A reload: the next login of each user looks it up afresh; servers keep logging in
        with the secret their clients were checked against until then."""
        self._cache = {user: (0.0, secret) for user, (_, secret) in self._cache.items()}
