"""Pools: one per (database, user) — idle servers, a FIFO of waiting clients, limits.

Limits can change at run time (`configure`): a lower limit closes idle servers at once
and busy ones as they come back (`release`); nothing in flight is ever cut.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from . import params, tls
from .config import DatabaseConfig, PoolerConfig, PoolMode
from .prepared import StatementRegistry
from .protocol import backend
from .protocol import errors as sqlstate
from .protocol.backend import IDLE
from .server import ServerConnection, ServerLoginError, ServerState
from .stats import PoolStats, WaitHistogram

if TYPE_CHECKING:
    from .client import ClientConnection
    from .passthrough import ScramKeys
    from .pooler import Pooler

log = logging.getLogger("pgfleet.pool")

_IDLE: Final = IDLE  # compiled (mypyc): a C static, not a module-dict lookup
FULL_RETRY: Final = 0.25  # seconds between logins while PostgreSQL has no slot free
# A database down or restarting is tried again after FIRST_RETRY seconds, then twice as
# long each time, up to server_login_retry (PgBouncer waits server_login_retry every time;
# a restart of a few seconds should cost clients a few seconds, not fifteen).
FIRST_RETRY: Final = 0.25
# What a client queued for query_wait_notify seconds hears (PgBouncer's words).
WAIT_NOTICE: Final = backend.notice_response(
    "01000", "No server connection available in postgres backend, client being queued"
)
# Login failures no retry cures: the server refused the role (class 28: wrong password,
# no such role, pg_hba) or has no such database (3D000). Anything else (connection refused,
# a timeout, 57P03 "the database system is starting up / shutting down", 53300 no slot
# free) is a database down or busy for now, and clients keep waiting for it.
_REFUSED_CLASSES: Final = ("28", "3D")
# Distinct parameter sets a pool shares among its clients before it starts over (a client
# naming itself differently each time must not grow the table without end).
_SHARED_PARAMS_LIMIT: Final = 256


def login_refused(error: ServerLoginError) -> bool:
    """Whether a failed server login is certain to fail again (see _REFUSED_CLASSES)."""
    return error.fields.get("C", "")[:2] in _REFUSED_CLASSES


class Pool:
    def __init__(self, pooler: Pooler, database: str, user: str) -> None:
        self.pooler = pooler
        self._clock = pooler.loop.time  # bound once: read for every transaction
        self.database = database
        self.user = user
        self.name = f"{database}/{user}"
        self.idle: collections.deque[ServerConnection] = collections.deque()
        self.active: set[ServerConnection] = set()
        self.connecting = 0
        self.waiting: collections.deque[ClientConnection] = collections.deque()
        # Its logged-in clients by their cancel key's process id, in login order: the map
        # that a CancelRequest is looked up in as well (Pooler.forward_cancel), so that an
        # idle client is one map entry (and one int), not two; the pooler's collection of
        # every client holds them through it.
        self.clients: dict[int, ClientConnection] = {}
        self.stats = PoolStats()
        self.waits = WaitHistogram()  # pgfleet_client_wait_seconds
        # Server-side names of the named statements its clients prepare (see prepared.py).
        self.statements = StatementRegistry()
        self.server_params: dict[str, str] | None = None
        # The parameter sets its clients see, each held once (see shared_params).
        self._shared_params: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        # Per startup packet's tracked parameters: what the client sees and its ParameterStatus
        # messages, for the server parameters they were made from (see client_welcome).
        self._welcomes: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], Mapping[str, str], bytes]] = {}
        # The last welcome made, by the identity of the startup parameters it was made for
        # (a startup packet's reading is shared by the clients sending it, see client._Startup):
        # a storm's next login of the same kind takes it without building a key.
        self._last_welcome: tuple[dict[str, str], dict[str, str], Mapping[str, str], bytes] | None = None
        self.paused = False
        # After a login that cannot succeed (login_refused) the pool answers with the
        # server's error at once, for server_login_retry, instead of hammering the server.
        self.last_error: ServerLoginError | None = None
        self.error_until = 0.0
        # After a login the database could not take now (down, restarting, full): clients
        # keep waiting and the pool tries again from this time on (see _login_failed).
        self.retry_at = 0.0
        self.retry_delay = 0.0  # the last wait between tries while the database is down
        self.last_failure: ServerLoginError | None = None  # why, told to clients who give up waiting
        self._retry_timer: asyncio.TimerHandle | None = None
        self.full_refusals = 0  # logins PostgreSQL refused with 53300, for /status
        # Set while this database holds more servers than a lowered max_db_connections.
        self.over_db_limit = False
        self.reserve_in_use = False
        self._params_waiters: list[asyncio.Future[dict[str, str]]] = []
        self._params_wait_start = 0.0  # when the first login still waiting for a server began
        self._tasks: set[asyncio.Task[None]] = set()
        self._target: tuple[object, ...] | None = None
        self.configure(pooler.config)

    # -- limits ---------------------------------------------------------------------------
    def configure(self, config: PoolerConfig) -> None:
        """(Re)read this pool's limits; apply a lower limit to idle servers now."""
        db = config.database(self.database) or DatabaseConfig()
        user = config.users.get(self.user)
        self.db_config = db
        self.server_dbname = db.dbname or self.database
        self.server_user = db.user or self.user
        target = (db.host, db.port, self.server_dbname, self.server_user, self._server_secret(), db.connect_query)
        if self._target is not None and target != self._target:
            self._retarget()
        self._target = target
        self.mode: PoolMode = (user and user.pool_mode) or db.pool_mode or config.pool_mode
        # Read by every link, so decided here once.
        self.refuses_blocks = self.mode is PoolMode.STATEMENT
        self.session_mode = self.mode is PoolMode.SESSION  # (PoolMode is not compiled: a lookup per use)
        self.maps_statements = self.mode is not PoolMode.SESSION and config.max_prepared_statements > 0
        self.server_lifetime = db.server_lifetime if db.server_lifetime is not None else config.server_lifetime
        self.check_delay = config.server_check_delay
        self.fast_close = config.server_fast_close and self.mode is PoolMode.SESSION
        # Whether a server coming back runs server_reset_query (read at every release).
        self.reset_on_release = self.mode is PoolMode.SESSION or config.server_reset_query_always
        self.timeouts = config.timeouts_for(self.database, self.user)
        limits = self.pooler.limits_for(self.database, self.user)
        self.pool_size = limits.pool_size
        self.min_pool_size = limits.min_pool_size
        self.reserve_pool_size = limits.reserve_pool_size
        self.max_db_connections = limits.max_db_connections
        self.max_user_connections = limits.max_user_connections
        self.trim()
        self.trim_database()
        self.launch_for_waiters()

    def _retarget(self) -> None:
        """The database entry now leads elsewhere (RELOAD): no server of the old target serves again.

        As PgBouncer: idle servers close now, busy ones when their client is done with
        them; errors and back-off learnt from the old target are forgotten.
        """
        log.info("pool %s: connection settings changed, closing its servers", self.name)
        self.close_idle(len(self.idle))
        for server in self.active:
            server.close_needed = True
        self.close_sessions_marked_to_close()
        self.server_params = None  # the new target greets clients with its own parameters
        self.last_error = None
        self.retry_at = self.retry_delay = 0.0

    @property
    def limit(self) -> int:
        return self.pool_size + (self.reserve_pool_size if self.reserve_in_use else 0)

    @property
    def server_count(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def trim(self) -> None:
        """Close idle servers above the current limit."""
        while self.idle and self.server_count > self.limit:
            self._close(self.idle.popleft(), "pool size lowered")

    def trim_database(self) -> None:
        """Close idle servers of this database above max_db_connections; busy ones close as they come back."""
        if not self.max_db_connections:
            self.over_db_limit = False
            return
        pooler = self.pooler
        while pooler.database_server_count(self.database) > self.max_db_connections:
            if not (self.close_idle(1) or pooler.evict_idle(self, by_database=True)):
                break
        self.over_db_limit = pooler.database_server_count(self.database) > self.max_db_connections

    def _room(self) -> bool:
        if self.server_count >= self.limit:
            return False
        pooler = self.pooler
        if self.max_db_connections and pooler.database_server_count(self.database) >= self.max_db_connections:
            return pooler.evict_idle(self, by_database=True)
        if self.max_user_connections and pooler.user_server_count(self.user) >= self.max_user_connections:
            return pooler.evict_idle(self, by_database=False)
        return True

    # -- serving clients --------------------------------------------------------------------
    def client_logged_in(self, client: ClientConnection, user: str) -> None:
        """`client`, logged in as `user` (the pool's own unless the database forces one)."""
        self.clients[client.cancel_pid] = client
        pooler = self.pooler
        pooler.clients.pooled(client)
        counts = pooler.database_clients
        counts[self.database] = counts.get(self.database, 0) + 1
        counts = pooler.user_clients
        counts[user] = counts.get(user, 0) + 1

    def has_client(self, client: ClientConnection) -> bool:
        return self.clients.get(client.cancel_pid) is client

    def client_gone(self, client: ClientConnection) -> None:
        if self.clients.get(client.cancel_pid) is client:
            del self.clients[client.cancel_pid]
            pooler = self.pooler
            pooler.database_clients[self.database] -= 1
            pooler.user_clients[client.user] -= 1
        # Waiting clients that left are skipped when their turn comes (O(1) here).

    def acquire(self, client: ClientConnection, now: float) -> None:
        """Link `client` to an idle server now, or queue it (FIFO) until one frees up.

        `now` is the loop's time, which the caller has read (as the loop's time stays the
        same all through a callback, the clock is not read twice)."""
        if not self.paused:
            lifetime = self.server_lifetime
            while self.idle:
                server = self.idle.pop()  # most recently used: warm caches, lets the rest age out
                if server.state is not ServerState.IDLE:
                    continue
                if lifetime and client.request_time - server.created_at > lifetime:
                    self._close(server, "server_lifetime")
                    continue
                if client.request_time - server.last_used > self.check_delay:
                    self._health_check(server)  # the client takes another idle server, or waits for it
                    continue
                # The hot path: no clock read, no wait statistics (nobody waited).
                server.state = ServerState.ACTIVE
                self.active.add(server)
                server.link_time = client.request_time
                client.link(server)
                return
        if self.pooler.refusing_servers:
            # SHUTDOWN WAIT_FOR_SERVERS: PgBouncer's answer, at once rather than never.
            client.terminate(sqlstate.PROTOCOL_VIOLATION, "server shutting down")
            return
        client.request_time = now  # its wait_start: the request waits from now
        client.wait_notified = False
        if self.last_error is not None and now < self.error_until and not self.connecting and not self.usable:
            client.fatal_fields(self.last_error.fields)
            return
        self.waiting.append(client)
        if self.server_count < self.limit:  # else _room() refuses: nothing to launch (the usual queue)
            self.launch_for_waiters()

    def _health_check(self, server: ServerConnection) -> None:
        """PgBouncer's server_check_query: a server idle past server_check_delay answers it first.

        It then goes to the first waiting client as any freed server does; one that fails
        the check (an error, a dead socket) is closed and replaced instead.
        """
        server.state = ServerState.ACTIVE
        self.active.add(server)
        server.run_internal(self.pooler.config.server_check_query, lambda: self._give_checked(server))

    def close_sessions_marked_to_close(self) -> None:
        """server_fast_close: session clients whose server is marked to close, idle now, end now."""
        if not self.fast_close:
            return
        for server in list(self.active):
            client = server.client
            if client is not None and server.close_needed and server.is_clean_but_marked:
                client.terminate(sqlstate.ADMIN_SHUTDOWN, "server_fast_close: the server connection is closing")

    def _activate(self, server: ServerConnection, client: ClientConnection, now: float) -> None:
        """Hand a server to a client that waited in the queue for it (`_give`: already ACTIVE)."""
        waited = now - client.wait_start
        self.stats.wait_time += int(waited * 1_000_000)
        self.stats.wait_count += 1
        self.waits.observe(waited)
        server.link_time = now
        client.link(server)

    def release(self, server: ServerConnection, unsynced: bool) -> None:
        """A client is done with `server` (transaction over, or the client left)."""
        now = self._clock()
        if server.link_time:
            self.stats.server_assignment_count += 1
            self.stats.xact_time += int((now - server.link_time) * 1_000_000)
            server.link_time = 0.0
        server.last_used = now
        if server.state is ServerState.CLOSED:
            return
        if server.outstanding > 0 or server.close_needed:
            # The client left while the server still owes it replies: nobody can vouch for
            # what state the server ends up in, so it is closed rather than reused.
            if server.outstanding > 0 and server.backend_pid:
                # Closing the socket alone would not stop PostgreSQL: the query would run
                # to its end on a backend the pool no longer counts. Cancel it, and close
                # (still counted meanwhile) once PostgreSQL has taken the cancel.
                self._close_after_cancel(server)
                return
            self._close(server, "client left with a request in flight")
            return
        server.outstanding = 0
        reset = self.reset_on_release
        if unsynced:
            server.close_extended_exchange()
        if unsynced or server.busy_internally or server.tx_status != _IDLE or reset or server.startup_sets:
            # Every way back to the pool but the hot path: the proxy's own queries in
            # flight are answered first, then the transaction rolled back, then the reset.
            self._clean_up_when_idle(server, reset)
        else:
            # The hot path: open, clean (checked above), last_used written.
            self._give(server, now)

    # The callbacks of release and _give are made apart from them: compiled, a function
    # holding a lambda allocates its closure's environment at every call, taken or not.
    def _close_after_cancel(self, server: ServerConnection) -> None:
        self.pooler.cancel_query(server)
        server.after_cancels = lambda: self._close_unless_closed(server, "client left with a request in flight")

    def _clean_up_when_idle(self, server: ServerConnection, reset: bool) -> None:
        server.when_idle(lambda: self._clean_up(server, reset))

    def _give_after_cancels(self, server: ServerConnection) -> None:
        server.after_cancels = lambda: self._give_checked(server)

    def _clean_up(self, server: ServerConnection, reset: bool) -> None:
        """Roll back what the client left open, reset the session if asked, then give.

        The reset runs after the rollback, never instead of it: a client that leaves
        inside a transaction (psycopg's default) has SETs, prepared statements, locks,
        LISTENs, temp tables and WITH HOLD cursors from committed ones too.
        """
        if server.state is ServerState.CLOSED:
            return
        if server.close_needed:
            self._close(server, "server not clean")
            return
        if server.tx_status != _IDLE:
            server.run_internal("ROLLBACK", lambda: self._clean_up(server, reset))
            return
        if server.startup_sets:
            # The client's startup settings (client.link) go back to the server's defaults.
            names, server.startup_sets = server.startup_sets, ()
            server.run_internal(params.reset_statement(names), lambda: self._clean_up(server, reset))
            return
        query = self.pooler.config.server_reset_query if reset else ""
        if query:
            server.run_internal(query, lambda: self._give_checked(server))
        else:
            self._give_checked(server)

    def _give_checked(self, server: ServerConnection) -> None:
        """`_give` for a server that may have closed or turned unfit meanwhile.

        A server back from the proxy's own query (ROLLBACK, reset), a new one (its
        connect_query may have failed), or one RESUME takes off the idle list.
        """
        if server.state is ServerState.CLOSED:
            return
        if not server.is_clean:
            self._close(server, "server not clean")
            return
        now = server.last_used = self._clock()
        self._give(server, now)

    def _give(self, server: ServerConnection, now: float) -> None:
        """Hand a server to the first waiting client, or put it on the idle list.

        The caller vouches that `server` is ACTIVE, in `self.active` and clean, and has
        set its `last_used`.
        """
        if server.cancels_in_flight:
            # A cancel for the client that just left may still land on this backend:
            # nobody else gets it before PostgreSQL has taken every such request.
            self._give_after_cancels(server)
            return
        if self.server_count > self.limit:
            self._close(server, "pool size lowered")
            return
        if self.over_db_limit:
            # Checked only while a lowered max_db_connections is not met yet: off the hot path.
            if self.pooler.database_server_count(self.database) > self.max_db_connections:
                self._close(server, "max_db_connections lowered")
                return
            self.over_db_limit = False
        if self.max_db_connections and self.pooler.yield_to_sibling(self):
            # The database is at max_db_connections and a sibling pool has waited longer:
            # its turn (the slot goes to it), not another round for this pool's queue.
            self._close(server, "max_db_connections: a sibling pool's turn")
            return
        if self.server_lifetime and now - server.created_at > self.server_lifetime:
            self._close(server, "server_lifetime")
            self.launch_for_waiters()
            return
        if not self.paused:
            while self.waiting:
                client = self.waiting.popleft()
                if client.transport is None or client.transport.is_closing() or client.server is not None:
                    continue
                self._activate(server, client, now)
                return
        self.active.discard(server)
        server.state = ServerState.IDLE
        self.idle.append(server)
        if self.reserve_in_use and not self.waiting:
            self.reserve_in_use = False
            self.trim()

    def resume(self) -> None:
        """RESUME after PAUSE/KILL: serve the clients that queued meanwhile."""
        self.paused = False
        while self.idle and self.waiting:
            server = self.idle.pop()
            self.active.add(server)  # _give hands it over or puts it back, as after _open
            server.state = ServerState.ACTIVE
            self._give_checked(server)
        self.launch_for_waiters()

    def refuse_transaction_block(self, client: ClientConnection, server: ServerConnection) -> None:
        """Statement mode: a statement opened a transaction. Roll it back and say why."""

        def done() -> None:
            client.send_error(
                sqlstate.FEATURE_NOT_SUPPORTED, "transaction blocks not allowed in statement pooling mode"
            )
            if client.server is server:
                client._release()

        server.run_internal("ROLLBACK", done)

    # -- opening and closing servers -------------------------------------------------------------
    def launch_for_waiters(self) -> None:
        if self.paused:
            return
        now = self.pooler.loop.time()
        if (self.last_error is not None and now < self.error_until) or now < self.retry_at:
            return
        # A client logging in before the pool has met its server waits too.
        wanted = len(self.waiting) + (1 if self._params_waiters else 0)
        while wanted > self.connecting and self._room():
            self.launch()

    def launch(self) -> None:
        self.connecting += 1
        task = self.pooler.loop.create_task(self._open())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self) -> None:
        loop = self.pooler.loop
        config = self.pooler.config
        db = self.db_config
        target = self._target
        server = ServerConnection(self)
        try:
            async with asyncio.timeout(config.server_connect_timeout or None):
                if db.unix_socket is not None:
                    await loop.create_unix_connection(lambda: server, db.unix_socket)
                else:
                    pooler = self.pooler
                    await tls.connect_server(loop, lambda: server, db.host, db.port, pooler.tls, pooler.tls_stats)
                    server.tls = tls.describe(server.transport)
                await server.login(self.server_user, self.server_dbname, self._server_secret())
                if db.connect_query:
                    done = loop.create_future()
                    server.run_internal(db.connect_query, lambda: done.set_result(None))
                    await done
        except (OSError, TimeoutError, ServerLoginError) as exc:
            self.connecting -= 1
            server.state = ServerState.CLOSED
            server.abort()
            self._login_failed(exc)
            return
        except BaseException:
            self.connecting -= 1
            server.state = ServerState.CLOSED
            server.abort()
            raise
        self.connecting -= 1
        # The database takes logins again: no cached error or back-off outlives that.
        self.last_error = None
        self.retry_delay = 0.0
        if server.state is ServerState.CLOSED:
            return
        self.last_failure = None
        if self._target != target:
            server.close_needed = True  # logged in to what a RELOAD has since moved away from
        else:
            if self.server_params is None:
                self.server_params = dict(server.params)
            for waiter in self._params_waiters:
                if not waiter.done():
                    waiter.set_result(self.server_params)
            self._params_waiters.clear()
        self.active.add(server)  # so that _give can move it wherever it belongs
        server.state = ServerState.ACTIVE
        self._give_checked(server)  # a failed connect_query leaves it unfit

    def _server_secret(self) -> str | ScramKeys | None:
        if self.db_config.password is not None:
            return self.db_config.password
        return self.pooler.credentials.server_secret(self.server_user)

    def oldest_wait(self) -> float | None:
        """When the longest wait for a server in this pool began (a queued transaction or a
        login that needs the pool's first server); None when nobody waits."""
        starts = [self._params_wait_start] if any(not w.done() for w in self._params_waiters) else []
        for client in self.waiting:
            if client.transport is not None and not client.transport.is_closing():
                starts.append(client.wait_start)
                break
        return min(starts) if starts else None

    @property
    def usable(self) -> bool:
        """Whether a server of this pool can still serve the queue (not one marked to close)."""
        return bool(self.idle) or any(not server.close_needed for server in self.active)

    def _login_failed(self, exc: Exception) -> None:
        if isinstance(exc, ServerLoginError) and exc.fields.get("C") == sqlstate.TOO_MANY_CONNECTIONS:
            self._database_full(exc)
            return
        if isinstance(exc, ServerLoginError):
            error = exc
        elif isinstance(exc, TimeoutError):
            error = ServerLoginError("pgfleet: server_connect_timeout: the database did not answer in time")
        elif isinstance(exc, tls.TlsRefused):
            # As a pg_hba refusal: no retry will pass until the config or the certificate changes.
            message = f"pgfleet: cannot connect to the database: {exc}"
            error = ServerLoginError(message, {"S": "FATAL", "C": sqlstate.INVALID_AUTHORIZATION, "M": message})
        else:
            error = ServerLoginError(f"pgfleet: cannot connect to the database: {exc}")
        config = self.pooler.config
        if not login_refused(error):
            # Down or restarting: the clients wait (up to query_wait_timeout) for the retry.
            self.last_failure = error
            self.retry_delay = min(max(FIRST_RETRY, self.retry_delay * 2), max(config.server_login_retry, FIRST_RETRY))
            if config.log_pooler_errors:
                log.warning("pool %s: server login failed, retrying in %gs: %s", self.name, self.retry_delay, error)
            self._retry_in(self.retry_delay)
            return
        if config.log_pooler_errors:
            log.warning("pool %s: server login failed: %s", self.name, error)
        self.last_error = error
        self.error_until = self.pooler.loop.time() + config.server_login_retry
        for waiter in self._params_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._params_waiters.clear()
        if not self.connecting and not self.usable:
            # Nobody can serve the queue (as PgBouncer: servers marked to close by RECONNECT
            # or a reload do not count): the clients hear the server's error now.
            waiting, self.waiting = self.waiting, collections.deque()
            for client in waiting:
                client.fatal_fields(error.fields)

    def _retry_in(self, delay: float) -> None:
        """Open servers for the queue again in `delay` seconds, not before."""
        self.retry_at = self.pooler.loop.time() + delay
        if self._retry_timer is not None:
            self._retry_timer.cancel()

        def retry() -> None:
            self._retry_timer = None
            self.launch_for_waiters()

        self._retry_timer = self.pooler.loop.call_later(delay, retry)

    def _database_full(self, error: ServerLoginError) -> None:
        """PostgreSQL has no slot free (53300): the budget is moving, so wait rather than fail.

        The error is the database's, not the client's: passing it on would fail clients that
        a moment later (once the operator lowers the pool) would have been served. They stay
        queued, bounded by query_wait_timeout, and the pool asks again shortly.
        """
        if self.pooler.config.log_pooler_errors:
            log.warning("pool %s: the database is full, retrying: %s", self.name, error.fields.get("M"))
        self.full_refusals += 1
        self._retry_in(FULL_RETRY)

    def shared_params(self, client_params: dict[str, str]) -> Mapping[str, str]:
        """One dict for every client of this pool that sees the same parameters, in the same order.

        Most clients of a pool see the same dozen values; each holding its own copy would
        cost a dict per idle client. Clients replace theirs on a change (never change it).
        """
        key = tuple(client_params.items())
        shared = self._shared_params.get(key)
        if shared is None:
            if len(self._shared_params) >= _SHARED_PARAMS_LIMIT:
                self._shared_params.clear()  # clients keep theirs; the next ones share anew
            shared = self._shared_params[key] = client_params
        return shared

    def client_welcome(self, startup_params: dict[str, str]) -> tuple[Mapping[str, str], bytes]:
        """What a client logging in with these tracked startup parameters sees (shared by
        every such client, see shared_params) and the ParameterStatus messages greeting it:
        the server's values, with the client's own as PostgreSQL would report them.

        Both are made once per distinct startup set and server parameters: a connection
        storm logs in the same few kinds of client again and again.
        """
        welcome = self.server_params
        assert welcome is not None
        last = self._last_welcome
        if last is not None and last[0] is startup_params and last[1] is welcome:
            return last[2], last[3]
        key = tuple(startup_params.items())
        cached = self._welcomes.get(key)
        if cached is not None and cached[0] is welcome:
            self._last_welcome = (startup_params, welcome, cached[1], cached[2])
            return cached[1], cached[2]
        seen = {name: value for name, value in welcome.items() if name in params.TRACKED}
        for name, value in startup_params.items():
            seen[name] = params.reported_value(name, value, welcome.get(name))
        shared = self.shared_params(seen)
        frames = [backend.parameter_status(name, shared.get(name, value)) for name, value in welcome.items()]
        frames.extend(backend.parameter_status(name, value) for name, value in shared.items() if name not in welcome)
        if len(self._welcomes) >= _SHARED_PARAMS_LIMIT:
            self._welcomes.clear()
        self._welcomes[key] = (welcome, shared, b"".join(frames))
        self._last_welcome = (startup_params, welcome, shared, self._welcomes[key][2])
        return shared, self._welcomes[key][2]

    async def welcome_params(self) -> dict[str, str]:
        """The server's ParameterStatus set a new client is greeted with."""
        if self.server_params is not None:
            return self.server_params
        loop = self.pooler.loop
        if self.last_error is not None and loop.time() < self.error_until:
            raise self.last_error
        waiter: asyncio.Future[dict[str, str]] = loop.create_future()
        if not self._params_waiters:
            self._params_wait_start = loop.time()
        self._params_waiters.append(waiter)
        # PAUSE holds logins too (no server opens while paused, as PgBouncer's); RESUME
        # launches for them (launch_for_waiters).
        if not self.paused and not self.connecting and self._room() and loop.time() >= self.retry_at:
            self.launch()
        try:
            # Bounded by client_login_timeout too; query_wait_timeout, as for any wait for a server.
            async with asyncio.timeout(self.pooler.config.query_wait_timeout or None):
                return await waiter
        except TimeoutError:
            raise self.last_failure or ServerLoginError("pgfleet: query_wait_timeout: no server in time") from None

    def server_closed(self, server: ServerConnection, previous: ServerState) -> None:
        """connection_lost of a server this pool still counted."""
        if previous is ServerState.IDLE:
            try:
                self.idle.remove(server)
            except ValueError:
                pass
        elif previous is ServerState.ACTIVE:
            self.active.discard(server)
        else:
            return
        self.pooler.server_slot_freed(self)

    def _close_unless_closed(self, server: ServerConnection, reason: str) -> None:
        if server.state is not ServerState.CLOSED:  # (it may have died meanwhile)
            self._close(server, reason)

    def _close(self, server: ServerConnection, reason: str) -> None:
        """Close a server this pool counts, and stop counting it now."""
        self.active.discard(server)
        server.state = ServerState.CLOSED
        server.close(reason)
        self.pooler.server_slot_freed(self)

    def close_idle(self, count: int = 1) -> int:
        closed = 0
        while self.idle and closed < count:
            self._close(self.idle.popleft(), "evicted for another pool")
            closed += 1
        return closed

    def shutdown(self, reason: str) -> None:
        """The pooler stops: abandon logins in progress, close every server."""
        for task in self._tasks:
            task.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self.close_all(reason, active=True)

    def close_all(self, reason: str, *, active: bool = False) -> None:
        while self.idle:
            self._close(self.idle.popleft(), reason)
        if active:
            for server in list(self.active):
                if server.client is not None:
                    server.client.server = None
                    server.client.terminate(sqlstate.ADMIN_SHUTDOWN, reason)
                    server.client = None
                self._close(server, reason)

    # -- maintenance (called by the pooler's janitor) ---------------------------------------------
    def maintain(self, now: float) -> None:
        config = self.pooler.config
        if config.query_wait_notify:
            for client in self.waiting:
                if now - client.wait_start <= config.query_wait_notify:
                    break  # the queue is in order of arrival: the rest waited less
                if not client.wait_notified:
                    # As PgBouncer's query_wait_notify: the client knows why it waits.
                    client.wait_notified = True
                    client.send(WAIT_NOTICE)
        if config.query_wait_timeout and self.waiting:
            while self.waiting and now - self.waiting[0].wait_start > config.query_wait_timeout:
                client = self.waiting.popleft()
                # PgBouncer's answer (08P01 "query_wait_timeout"); the detail says why, if known.
                why = self.last_failure.fields.get("M") if self.last_failure is not None else None
                client.terminate(sqlstate.PROTOCOL_VIOLATION, "query_wait_timeout", why)
        if (
            self.waiting
            and self.reserve_pool_size
            and not self.reserve_in_use
            and now - self.waiting[0].wait_start > config.reserve_pool_timeout
        ):
            self.reserve_in_use = True
            log.info("pool %s: using reserve pool", self.name)
        if self.waiting:
            self.launch_for_waiters()
        for server in list(self.idle):
            age = now - server.created_at
            idle_for = now - server.last_used
            if self.server_lifetime and age > self.server_lifetime:
                self.idle.remove(server)
                self._close(server, "server_lifetime")
            elif (
                config.server_idle_timeout
                and idle_for > config.server_idle_timeout
                and self.server_count > self.min_pool_size
            ):
                self.idle.remove(server)
                self._close(server, "server_idle_timeout")
        # A forced-user database's pool fills before its first client, as PgBouncer's.
        if self.min_pool_size and (self.clients or self.db_config.user) and not self.paused:
            while (
                self.server_count < self.min_pool_size
                and self._room()
                and not (self.last_error and now < self.error_until)
                and now >= self.retry_at
            ):
                self.launch()
