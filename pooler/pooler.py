"""The pooler process: listeners, the pools, cancel keys, maintenance, reload and drain."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import resource
import socket
import ssl
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .config import TIMEOUT_KEYS, AuthType, ConfigError, PoolerConfig, PoolLimits, load_config, merge_limits
from .credentials import Credentials
from .hba import rules_for
from .pool import Pool
from .protocol import errors as sqlstate
from .protocol.backend import IDLE
from .protocol.startup import build_cancel_request
from .shares import WorkerSlot
from .tls import TlsContexts, TlsStats, build_contexts, file_signature, open_server_stream
from .userlist import load_userlist

if TYPE_CHECKING:
    from .client import ClientConnection, ClientState
    from .server import ServerConnection

log = logging.getLogger("pgfleet.pooler")

# The admin console's virtual database: its sessions outlive a graceful shutdown.
ADMIN_DATABASE = "pgbouncer"

# Connections accepted beyond max_client_conn before any is turned away unread: room for
# the admin console and CancelRequests, which the limit does not apply to.
_ACCEPT_MARGIN = 16
_LIMIT_LOG_INTERVAL = 10.0
_LOGIN_POOLS_LIMIT = 4096
# client_login_timeout's timer fires this much before a deadline at the latest (uvloop's
# timers count whole milliseconds): a client due within it is timed out in that sweep.
_LOGIN_TIMER_SLACK = 0.001

# Settings that cannot change without a restart (the sockets are already bound).
RESTART_ONLY = ("listen_addr", "listen_port", "unix_socket_dir", "http_listen_addr", "http_listen_port")


class Clients:
    """Every client connection of this process, as one collection (its length, iteration).

    A client logged in to a pool is held by that pool's map (Pool.clients, by cancel key,
    which is also where a CancelRequest finds it) alone; this one holds the others (logging
    in, on the admin console): one map entry per client, not two or three (at 10,000 idle
    clients a map's entry is about 30 bytes).
    """

    def __init__(self, pools: Mapping[tuple[str, str], Pool]) -> None:
        self._pools = pools
        self._unpooled: dict[ClientConnection, None] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ClientConnection]:
        # As a dict's: a caller that ends clients takes a list first (an ended client
        # leaves its map).
        yield from self._unpooled
        for pool in self._pools.values():
            yield from pool.clients.values()

    def logging_in(self) -> Iterator[ClientConnection]:
        """The clients not in a pool (logging in, on the admin console), oldest first."""
        return iter(self._unpooled)

    def add(self, client: ClientConnection) -> None:
        self._unpooled[client] = None
        self._count += 1

    def pooled(self, client: ClientConnection) -> None:
        """`client` logged in to a pool, whose map holds it from now on."""
        self._unpooled.pop(client, None)

    def remove(self, client: ClientConnection) -> None:
        """`client` is gone (before its pool forgets it: Pool.client_gone)."""
        if client in self._unpooled:
            del self._unpooled[client]
            self._count -= 1
        elif client.pool is not None and client.pool.has_client(client):
            self._count -= 1


def _tls_settings(config: PoolerConfig) -> dict[str, Any]:
    return {key: value for key, value in config if key.startswith(("client_tls_", "server_tls_"))}


class Pooler:
    def __init__(self, config: PoolerConfig, config_path: str | None = None, slot: WorkerSlot | None = None) -> None:
        self.config = config
        self.slot = slot or WorkerSlot()
        self.config_path = config_path
        self.loop = asyncio.get_running_loop()
        # The loop's clock, bound once and shared: every client and pool reads it per message.
        self.clock = self.loop.time
        self.userlist: dict[str, str] = load_userlist(config.auth_file) if config.auth_file else {}
        self.tls: TlsContexts = build_contexts(config)
        # Of self.tls, what every login reads, as plain fields (see _config_applied).
        self.client_tls_demanded = self.tls.client_mode.demands_tls
        self.client_tls_context: ssl.SSLContext | None = self.tls.client
        self._tls_files = file_signature(config)
        self.credentials = Credentials(self)
        self.hba = rules_for(config)
        self.tls_stats = TlsStats()
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients = Clients(self.pools)  # every client connection
        self.logged_in_clients = 0
        self._limit_refusals = 0
        self._limit_logged_at = float("-inf")
        self._fd_logged_at = float("-inf")
        # Logged-in clients per database and per (login) user: max_*_client_connections.
        # Plain dicts (read with .get(name, 0)): compiled, two native dict operations per
        # login and per logout, where a Counter's are generic calls.
        self.database_clients: dict[str, int] = {}
        self.user_clients: dict[str, int] = {}
        # (database, login user) -> its pool, under the config of the moment (see login_pool).
        self._login_pools: dict[tuple[str, str], Pool] = {}
        # client_login_timeout's one timer (see _sweep_logins), armed while a client logs in.
        self._login_timer: asyncio.TimerHandle | None = None
        self._login_timer_at = 0.0
        self._config_applied(config)
        self.draining = False
        self.disabled_databases: set[str] = set()  # DISABLE: new clients refused
        self.client_ids = itertools.count(1)  # SHOW CLIENTS' id, KILL_CLIENT's argument
        self._client_timeouts = config.has_client_timeouts()
        # SHUTDOWN WAIT_FOR_SERVERS: no client gets a server any more (pool.acquire).
        self.refusing_servers = False
        self.started_at = self.loop.time()
        self._cancel_tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._unix_servers: list[asyncio.Server] = []  # kept open by a graceful shutdown
        self._janitor: asyncio.TimerHandle | None = None
        self._stopped = self.loop.create_future()
        self._drain_deadline: asyncio.TimerHandle | None = None
        # Hooks the admin surface fills in (kept here so the core does not import it).
        self.admin: Any = None
        try:
            from .admin import AdminConsole
        except ModuleNotFoundError:
            pass
        else:
            self.admin = AdminConsole(self)

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        from .client import ClientConnection

        def factory() -> asyncio.Protocol:
            return ClientConnection(self).as_protocol()

        def unix_factory() -> asyncio.Protocol:
            return ClientConnection(self, unix=True).as_protocol()

        host: str | None = None if config.listen_addr in ("*", "") else config.listen_addr
        slot = self.slot
        # Workers share the port; the kernel spreads new connections among them.
        server = await self.loop.create_server(
            factory, host, config.listen_port, reuse_address=True, reuse_port=not slot.single, backlog=4096
        )
        self._servers.append(server)
        if not slot.single:
            path = slot.cancel_socket(slot.index)
            path.unlink(missing_ok=True)
            self._servers.append(await self.loop.create_unix_server(unix_factory, str(path), backlog=1024))
            self._unix_servers.append(self._servers[-1])
        if config.unix_socket_dir and slot.index == 0:
            # A unix socket path cannot be shared; the first worker alone listens there.
            path = Path(config.unix_socket_dir) / f".s.PGSQL.{config.listen_port}"
            path.unlink(missing_ok=True)
            self._servers.append(await self.loop.create_unix_server(unix_factory, str(path), backlog=4096))
            self._unix_servers.append(self._servers[-1])
        self._schedule_janitor()
        self._open_forced_pools()
        if slot.single:
            log.info("listening on %s:%s", config.listen_addr, self.port)
        else:
            log.info("worker %d of %d listening on %s:%s", slot.index + 1, slot.count, config.listen_addr, self.port)

    @property
    def port(self) -> int:
        for server in self._servers:
            # Any: uvloop's server gives a list where asyncio's (and the stubs) give a
            # tuple, and the compiled build checks a tuple's type.
            for sock in cast(Any, server).sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return self.config.listen_port

    async def wait_stopped(self) -> None:
        await asyncio.shield(self._stopped)

    async def stop(self) -> None:
        """Stop now: close listeners, clients and servers (SIGINT)."""
        self._close_listeners()
        for client in list(self.clients):
            client.terminate(sqlstate.ADMIN_SHUTDOWN, "pgfleet is shutting down")
        closing = [server for pool in self.pools.values() for server in (*pool.idle, *pool.active)]
        for pool in self.pools.values():
            pool.shutdown("pooler stopping")
        cancels = list(self._cancel_tasks)
        for task in cancels:
            task.cancel()
        await asyncio.gather(*cancels, return_exceptions=True)
        if any(server.tls for server in closing):
            # A TLS link closes with an exchange of close_notify: a few turns of the loop,
            # which must still run for the sockets to be closed rather than dropped.
            try:
                async with asyncio.timeout(2):
                    await asyncio.gather(*(server.wait_closed() for server in closing))
            except TimeoutError:
                log.warning("TLS server connections still closing at exit")
        if self._janitor is not None:
            self._janitor.cancel()
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if not self._stopped.done():
            self._stopped.set_result(None)

    def _close_listeners(self, *, keep_unix: bool = False) -> None:
        """Stop accepting; `keep_unix`: the unix sockets stay, for the admin console (and
        cancels between workers) while a graceful shutdown lasts, as PgBouncer's."""
        for server in self._servers:
            if not (keep_unix and server in self._unix_servers):
                server.close()
        self._servers = list(self._unix_servers) if keep_unix else []

    def drain(self) -> None:
        """SIGTERM: stop accepting; let each client finish its transaction, then close it.

        Admin console sessions stay (and new ones may log in over the unix socket) until
        the last application client has gone.
        """
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d clients", len(self.clients))
        self._close_listeners(keep_unix=True)
        from .client import ClientState

        for client in list(self.clients):
            if client.database == ADMIN_DATABASE:
                continue
            client.close_at_boundary = True
            if client.state in (ClientState.IDLE, ClientState.STARTUP, ClientState.LOGIN) and not client._pending:
                client.terminate(sqlstate.ADMIN_SHUTDOWN, "pgfleet is shutting down; reconnect")
        if self.config.shutdown_timeout:
            self._drain_deadline = self.loop.call_later(self.config.shutdown_timeout, self._drain_timeout)
        self._check_drained()

    def _drain_timeout(self) -> None:
        log.warning("shutdown_timeout reached with %d clients left", len(self.clients))
        self.loop.create_task(self.stop())

    def _check_drained(self) -> None:
        if (
            self.draining
            and not self._stopped.done()
            and all(client.database == ADMIN_DATABASE for client in self.clients)
        ):
            if self._drain_deadline is not None:
                self._drain_deadline.cancel()
            self.loop.create_task(self.stop())

    # -- configuration ---------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP / RELOAD: read the config file again and apply what can change live."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path, workers=self.slot.count)
            # Certificates and keys are read again: new handshakes use rotated files,
            # links already open keep theirs.
            tls = build_contexts(new)
            # The auth_file too: apply_config reads it before it changes anything.
            self.apply_config(new, tls)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            raise

    def apply_config(self, new: PoolerConfig, tls: TlsContexts | None = None) -> list[str]:
        """Switch to `new`; returns the settings that need a restart to take effect."""
        if tls is None and _tls_settings(new) != _tls_settings(self.config):
            tls = build_contexts(new)
        rules = rules_for(new)
        userlist = load_userlist(new.auth_file) if new.auth_file else {}
        pending = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        for key in pending:
            log.warning("%s changed: takes effect after a restart", key)
        if new.log_disconnections and not self.log_disconnections:
            for client in list(self.clients):
                client.address  # noqa: B018  (asked while known: their logout lines say it, see ClientConnection.address)
        self.config = new
        self._config_applied(new)
        self.userlist = userlist
        self.hba = rules
        self._client_timeouts = new.has_client_timeouts()
        self.credentials.forget()
        if tls is not None:
            self.tls = tls
            self.client_tls_demanded = tls.client_mode.demands_tls
            self.client_tls_context = tls.client
            self._tls_files = file_signature(new)
        for pool in list(self.pools.values()):
            pool.configure(new)
        self._open_forced_pools()
        self._schedule_janitor()
        if self.login_timeout:
            self._arm_login_timer(self.loop.time())  # a limit set by this reload applies to logins under way
        return pending

    def _config_applied(self, config: PoolerConfig) -> None:
        """What every login reads of the config, kept as plain fields: compiled, a field is
        a load, where a read of the config model is a generic attribute lookup."""
        self.login_timeout: float = config.client_login_timeout
        self.log_connections: bool = config.log_connections
        self.log_disconnections: bool = config.log_disconnections
        self.auth_type: AuthType = config.auth_type
        self.auth_file: str = config.auth_file or ""
        self.auth_user: str = config.auth_user or ""
        self._client_limit: int = self.slot.portion(config.max_client_conn)
        # Any max_db_client_connections or max_user_client_connections: client_refused looks.
        self._client_limits = bool(
            config.max_db_client_connections
            or config.max_user_client_connections
            or any(db.max_db_client_connections for db in config.databases.values())
            or any(user.max_user_client_connections for user in config.users.values())
        )
        self._login_pools = {}

    def set_limits(self, changes: dict[str, Any]) -> PoolerConfig:
        """Merge `changes` (config terms) into the running config and apply them now."""
        new = merge_limits(self.config, changes)
        self.apply_config(new)
        return new

    # -- pools --------------------------------------------------------------------------------------
    def login_pool(self, database: str, user: str) -> Pool | None:
        """The pool of a client logging in as `user` to `database`; None: no such database.
        Found once per (database, user) and config: a storm's logins look up the same one."""
        key = (database, user)
        pool = self._login_pools.get(key)
        if pool is None:
            if self.config.database(database) is None:
                return None
            pool = self.get_pool(database, user)
            if len(self._login_pools) >= _LOGIN_POOLS_LIMIT:
                self._login_pools.clear()
            self._login_pools[key] = pool
        return pool

    def get_pool(self, database: str, user: str) -> Pool:
        """The pool serving `user` on `database`: a database with a forced user has one
        pool, the forced user's, whoever logs in (as PgBouncer)."""
        db = self.config.database(database)
        if db is not None and db.user:
            user = db.user
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, database, user)
            if self.admin is not None:
                self.admin.pool_created(pool)  # a paused database's new pool starts paused
        return pool

    def _open_forced_pools(self) -> None:
        """Pools that min_pool_size fills before any client comes: forced-user databases'."""
        for name, db in self.config.databases.items():
            if name != "*" and db.user and self.limits_for(name, db.user).min_pool_size:
                self.get_pool(name, db.user)

    def database_server_count(self, database: str) -> int:
        return sum(p.server_count for p in self.pools.values() if p.database == database)

    def user_server_count(self, user: str) -> int:
        return sum(p.server_count for p in self.pools.values() if p.user == user)

    def evict_idle(self, requester: Pool, *, by_database: bool) -> bool:
        """Close an idle server of a sibling pool so `requester` may open one."""
        for pool in self.pools.values():
            if pool is requester or not pool.idle:
                continue
            if (pool.database == requester.database) if by_database else (pool.user == requester.user):
                pool.close_idle(1)
                return True
        return False

    def server_slot_freed(self, pool: Pool) -> None:
        """A server closed: the pools it counted against may open one now.

        Deferred to the next loop turn: a slot is often freed from inside a pool's own
        launch loop (evicting an idle sibling), and re-entering it there would open one
        server more than the cap allows.
        """
        self.loop.call_soon(self._launch_where_waiting, pool.database, pool.user)

    def _launch_where_waiting(self, database: str, user: str) -> None:
        # Longest wait first: under max_db_connections the freed slot goes to the pool whose
        # client has waited longest, not to whichever pool comes first.
        pools = [other for other in self.pools.values() if other.database == database or other.user == user]
        waits = {id(pool): pool.oldest_wait() for pool in pools}
        pools.sort(key=lambda pool: (waits[id(pool)] is None, waits[id(pool)] or 0.0))
        for other in pools:
            other.launch_for_waiters()

    def yield_to_sibling(self, pool: Pool) -> bool:
        """Whether `pool` should give up a freed server: its database is at max_db_connections
        and another of its pools has a client that has waited longer than any of `pool`'s."""
        if self.database_server_count(pool.database) < pool.max_db_connections:
            return False
        mine = pool.oldest_wait()
        for other in self.pools.values():
            if other is pool or other.database != pool.database or other.paused:
                continue
            theirs = other.oldest_wait()
            if theirs is not None and (mine is None or theirs < mine) and other.server_count < other.limit:
                return True
        return False

    # -- clients --------------------------------------------------------------------------------------
    def client_connected(self, client: ClientConnection) -> bool:
        """A connection was accepted; False when there are so many that it is turned away now.

        Clients count from accept (as in PgBouncer), also while they log in: the limit
        itself is applied to the startup packet (`over_client_limit`), so that the admin
        console still gets in; past a margin above it, a socket is refused before it is
        read, so that silent connections cannot take every file descriptor.
        """
        self.clients.add(client)
        if len(self.clients) > self._client_limit + _ACCEPT_MARGIN:
            self.client_limit_hit()
            return False
        if self.login_timeout and self._login_timer is None:
            self._arm_login_timer(client.connect_time + self.login_timeout)
        return True

    def login_resumed(self, client: ClientConnection) -> None:
        """`client`'s login goes on inline again (after a TLS handshake in a task, under
        its own timeout): client_login_timeout's timer covers it again from here."""
        if self.login_timeout:
            self._arm_login_timer(client.connect_time + self.login_timeout)

    def _arm_login_timer(self, deadline: float) -> None:
        """client_login_timeout: one timer for every client logging in inline, at the
        earliest deadline (as PgBouncer, which checks logins in its janitor, rather than a
        timer per login: a storm's logins are each over long before theirs)."""
        timer = self._login_timer
        if timer is not None:
            if self._login_timer_at <= deadline:
                return
            timer.cancel()
        self._login_timer_at = deadline
        self._login_timer = self.loop.call_at(deadline, self._sweep_logins)

    def _sweep_logins(self) -> None:
        """End the logins past client_login_timeout; arm the timer for the next deadline.

        The clients not in a pool are kept in the order they connected, so the deadlines
        come in that order too: the sweep stops at the first one not yet due. A login
        waiting in a task (a TLS handshake, auth_query, a pool's first server, the admin
        console) is under that task's own timeout and is passed over, as is a client
        logged in to the admin console."""
        self._login_timer = None
        timeout = self.login_timeout
        if not timeout:
            return
        now = self.loop.time()
        due: list[ClientConnection] = []
        for client in self.clients.logging_in():
            if not client.logging_in_inline():
                continue
            deadline = client.connect_time + timeout
            if deadline > now + _LOGIN_TIMER_SLACK:
                self._arm_login_timer(deadline)
                break
            due.append(client)
        for client in due:
            client.login_timed_out()

    def over_client_limit(self) -> bool:
        return len(self.clients) > self._client_limit

    def client_limit_hit(self) -> None:
        """Log a refusal for max_client_conn, at most once per interval (a flood would flood the log)."""
        self._limit_refusals += 1
        now = self.loop.time()
        if now >= self._limit_logged_at + _LIMIT_LOG_INTERVAL:
            log.warning(
                "max_client_conn (%d) reached: %d connection(s) refused since the last message",
                self.client_limit,
                self._limit_refusals,
            )
            self._limit_logged_at = now
            self._limit_refusals = 0

    def client_disconnected(self, client: ClientConnection, previous: ClientState) -> None:
        self.clients.remove(client)
        if client.cancel_pid:
            self.logged_in_clients -= 1
        if client.pool is not None:
            client.pool.client_gone(client)
        if self.log_disconnections and client.cancel_pid:
            log.info("logout: %s@%s from %s:%s", client.user, client.database, *client.address)
        self._check_drained()

    def limits_for(self, database: str, user: str | None = None) -> PoolLimits:
        """The limits this process applies to a pool: with workers, its share of them."""
        return self.config.limits_for(database, user).portioned(self.slot.portion)

    def client_refused(self, database: str, user: str) -> str | None:
        """Why one more client of `user` on `database` would exceed a client limit (None: it would not)."""
        if not self._client_limits:
            return None  # none configured (the usual case): nothing to look up
        per_db, per_user = self.config.client_limits_for(database, user)
        if per_db and self.database_clients.get(database, 0) >= self.slot.portion(per_db):
            return "no more connections allowed (max_db_client_connections)"
        if per_user and self.user_clients.get(user, 0) >= self.slot.portion(per_user):
            return "no more connections allowed (max_user_client_connections)"
        return None

    @property
    def client_limit(self) -> int:
        """This process's part of max_client_conn."""
        return self._client_limit

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """A new cancel key for `client`; its pool (`client.pool`, set) takes it into its map,
        keyed by the process id (Pool.client_logged_in), which is unique in that map. The
        admin console's clients have no pool: a cancel request cannot reach them."""
        pool = client.pool
        while True:
            pid, key = self.slot.new_cancel_key()
            if pool is None or pid not in pool.clients:
                break
        self.logged_in_clients += 1
        return pid, key

    def forward_cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: cancel whatever that client's server is running now."""
        slot = self.slot
        if not slot.single and slot.owner_of(pid) != slot.index:
            # The kernel gave this cancel connection to another worker than the client's.
            path = str(slot.cancel_socket(slot.owner_of(pid)))
            self._track(self._send_cancel(path, pid, key))
            return
        # The pools' maps are the map of cancel keys (one lookup per pool: a process id is
        # unique within a pool, the secret tells two pools' clients apart).
        for pool in self.pools.values():
            client = pool.clients.get(pid)
            if client is not None and client.cancel_secret == key:
                break
        else:
            return  # PostgreSQL too ignores cancel requests with a wrong key, silently
        server = client.server
        if server is None or not server.backend_pid:
            return
        self.cancel_query(server)

    def cancel_query(self, server: ServerConnection) -> None:
        """Ask PostgreSQL to cancel what `server`'s backend runs (its `cancel_done` follows)."""
        server.cancels_in_flight += 1
        self._track(self._cancel_server(server))

    async def _cancel_server(self, server: ServerConnection) -> None:
        db = server.pool.db_config
        try:
            await self._send_cancel(db.unix_socket or (db.host, db.port), server.backend_pid, server.backend_key)
        finally:
            server.cancel_done()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        # Kept so that stop() can end a cancel still in flight (and close its socket).
        self._cancel_tasks.add(task)
        task.add_done_callback(self._cancel_tasks.discard)

    async def _send_cancel(self, address: str | tuple[str, int], pid: int, key: int) -> None:
        """Send a CancelRequest to a unix socket path (a server's, a sibling worker's) or (host, port)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.server_connect_timeout or 15):
                if isinstance(address, str):
                    reader, writer = await asyncio.open_unix_connection(address)
                else:
                    # The same negotiation as the pool's links: a TLS-only server gets its cancel over TLS.
                    reader, writer = await open_server_stream(self.loop, *address, self.tls, self.tls_stats)
                writer.write(build_cancel_request(pid, key))
                await writer.drain()
                await reader.read()  # the server closes the connection when done
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request to %s failed: %s", address, exc)
        finally:
            if writer is not None:
                # Nothing more to say; over TLS, close() would wait for a close_notify exchange.
                writer.transport.abort()

    async def admin_login(self, client: ClientConnection) -> None:
        if self.admin is None:
            from .client import ClientError

            raise ClientError(sqlstate.INVALID_CATALOG_NAME, 'no such database: "pgbouncer"')
        await self.admin.login(client)

    # -- maintenance ----------------------------------------------------------------------------------
    def _janitor_period(self) -> float:
        config = self.config
        entries = [*config.databases.values(), *config.users.values()]
        timeouts = [
            t
            for t in (
                config.query_wait_timeout,
                config.query_wait_notify,
                config.client_idle_timeout,
                config.idle_transaction_timeout,
                config.query_timeout,
                config.transaction_timeout,
                config.server_idle_timeout,
                config.reserve_pool_timeout,
                config.server_login_retry,
                *(getattr(entry, key) or 0 for entry in entries for key in TIMEOUT_KEYS),
            )
            if t
        ]
        return max(0.05, min([1.0, *(t / 4 for t in timeouts)]))

    def _schedule_janitor(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        self._janitor = self.loop.call_later(self._janitor_period(), self._run_janitor)

    def _run_janitor(self) -> None:
        try:
            self.maintain()
        except Exception:
            log.exception("maintenance failed")
        self._janitor = self.loop.call_later(self._janitor_period(), self._run_janitor)

    def maintain(self) -> None:
        now = self.loop.time()
        for pool in list(self.pools.values()):
            pool.maintain(now)
        self._check_client_timeouts(now)
        self._watch_tls_files()
        self._check_fd_room(now)

    def _check_fd_room(self, now: float) -> None:
        """Say so when the process has no file descriptor left.

        Then accept() fails with EMFILE/ENFILE and the event loop is silent about it
        (uvloop's libuv accepts and closes the connection; asyncio retries a second
        later): clients see a closed socket and nothing explains it. A probe each
        janitor turn costs two system calls.
        """
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if now >= self._fd_logged_at + _LIMIT_LOG_INTERVAL:
                self._fd_logged_at = now
                log.error(
                    "out of file descriptors (%s, limit %d): new connections fail at accept; "
                    "%d clients, %d servers open. Raise the limit or lower max_client_conn",
                    os.strerror(exc.errno),
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    len(self.clients),
                    sum(pool.server_count for pool in self.pools.values()),
                )
            return
        os.close(fd)

    def _watch_tls_files(self) -> None:
        """Key and certificate files rotated on disk (a Secret volume) serve new handshakes
        without a reload; open connections keep their sessions."""
        signature = file_signature(self.config)
        if signature == self._tls_files:
            return
        self._tls_files = signature  # one message per change, not one per janitor turn
        try:
            self.tls = build_contexts(self.config)
            self.client_tls_demanded = self.tls.client_mode.demands_tls
            self.client_tls_context = self.tls.client
        except ConfigError as exc:
            log.error("TLS files changed but cannot be used, keeping the running ones: %s", exc)
            return
        log.info("TLS files changed: new handshakes use them")

    def _check_client_timeouts(self, now: float) -> None:
        """Close clients past a time limit with PgBouncer's 08P01 and its words for it.

        Each client's limits are its pool's (a user's setting, else its database's, else
        the global one). A client closed mid-query has its query cancelled and its server
        closed (pool.release); one closed inside an idle transaction has it rolled back.
        """
        from .client import ClientState

        if not self._client_timeouts:
            return
        for client in list(self.clients):
            pool = client.pool
            if pool is None:
                continue  # logging in, or an admin console session
            limits = pool.timeouts
            idle_for = now - client.last_activity
            if client.state is ClientState.IDLE:
                if limits.client_idle_timeout and idle_for > limits.client_idle_timeout:
                    client.terminate(sqlstate.PROTOCOL_VIOLATION, "client_idle_timeout")
                continue
            server = client.server
            if client.state is not ClientState.ACTIVE or server is None:
                continue
            in_transaction = server.tx_status != IDLE
            busy = server.outstanding > 0
            if limits.transaction_timeout and (in_transaction or busy):
                began = server.xact_start if in_transaction else client.request_time
                if now - began > limits.transaction_timeout:
                    client.terminate(sqlstate.PROTOCOL_VIOLATION, "transaction timeout")
                    continue
            if busy:
                if limits.query_timeout and now - client.request_time > limits.query_timeout:
                    client.terminate(sqlstate.PROTOCOL_VIOLATION, "query timeout")
            elif in_transaction:
                if limits.idle_transaction_timeout and idle_for > limits.idle_transaction_timeout:
                    client.terminate(sqlstate.PROTOCOL_VIOLATION, "idle transaction timeout")
            elif limits.client_idle_timeout and idle_for > limits.client_idle_timeout:
                client.terminate(sqlstate.PROTOCOL_VIOLATION, "client_idle_timeout")  # a session-mode client
