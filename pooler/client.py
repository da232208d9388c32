"""Handling of client connections: startup and login, then the per-message hot path.

A client link moves STARTUP → LOGIN → IDLE ⇄ WAITING → ACTIVE → … → CLOSED. IDLE means
logged in with no server; WAITING means queued in its pool for one; ACTIVE means linked
to a server. Client messages are framed (header only) to count the replies the client
waits for; the server goes back to the pool when the last of them arrives and the
transaction is over (see `server_ready`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import ssl
import struct
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

from . import auth, hba, params, prepared, sqlscan, tls, turns
from .config import AuthType, PoolerConfig
from .protocol import backend, frontend
from .protocol import errors as sqlstate
from .protocol.backend import IDLE
from .protocol.errors import ProtocolError, StartupLengthError
from .protocol.extended import STATEMENT
from .protocol.framing import MAX_MESSAGE_LENGTH, MessageReader, StartupReader, type_table
from .protocol.startup import (
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)
from .server import ServerConnection, ServerLoginError

if TYPE_CHECKING:
    from mypy_extensions import i32

    from .pool import Pool
    from .pooler import Pooler

log = logging.getLogger("pgfleet.client")

# Final: compiled (mypyc), names read for every message are C statics, not lookups in
# the module's dict (an imported name is such a lookup, hence the aliases).
_Q: Final = ord("Q")
_S: Final = ord("S")
_X: Final = ord("X")
_F: Final = ord("F")
_H: Final = ord("H")
_P: Final = ord("P")
_B: Final = ord("B")
_D: Final = ord("D")
_C: Final = ord("C")
_STATEMENT: Final = STATEMENT
_IDLE: Final = IDLE
# Extended-protocol messages: after one of them the server is busy until the next Sync.
# Tables indexed by message type (framing.type_table): compiled, a load, not a set probe.
_EXTENDED: Final = type_table(b"PBDEC")
_COPY: Final = type_table(b"dcf")
_KIND_AND_NAME: Final = type_table(b"CD")  # Close, Describe
_ADMIN_DATABASE = "pgbouncer"
_HBA_METHODS = {
    "trust": AuthType.TRUST,
    "password": AuthType.PLAIN,
    "md5": AuthType.MD5,
    "scram-sha-256": AuthType.SCRAM_SHA_256,
}
_NO_MORE_CONNECTIONS = "no more connections allowed (max_client_conn)"
# The methods, as C statics (compiled): a member read of the enum is a generic lookup.
_HBA: Final = AuthType.HBA
_ANY: Final = AuthType.ANY
_TRUST: Final = AuthType.TRUST
_PLAIN: Final = AuthType.PLAIN
_MD5: Final = AuthType.MD5
_SCRAM: Final = AuthType.SCRAM_SHA_256
# An SSLRequest's body: answered 'N' without parsing it when TLS is not offered.
_SSL_REQUEST_BODY: Final = SSL_REQUEST_CODE.to_bytes(4, "big")
# Built once: every login sends them.
_AUTH_OK: Final = backend.authentication_ok()
_AUTH_SASL: Final = backend.authentication_sasl([auth.SCRAM])
_PASSWORD: Final = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse
_READY_IDLE: Final = backend.ready_for_query(IDLE)
# The first byte of a TLS handshake record: a connection that opens with it negotiates TLS
# directly (PostgreSQL 17's sslnegotiation=direct) instead of sending SSLRequest.
_TLS_HANDSHAKE: Final = bytes((tls.HANDSHAKE_RECORD,))
# A queued client keeps being read until it has sent this much: pausing and resuming the
# socket for every queued transaction would cost two syscalls each, and a client that
# waits for its answer rarely sends more than one message meanwhile.
_QUEUED_BUFFER_LIMIT: Final = 64 * 1024
# A message longer than this is not held whole: its head is read and sent on, and the
# rest goes straight through to the server as it arrives, paced by the server's socket
# (its back-pressure pauses reading this client). The SQL of a Query or an unmapped Parse
# that long is not scanned for session state. A mapped named Parse is still held whole:
# its statement is kept to prepare it on other servers.
_STREAM_AFTER: Final = 256 * 1024
# PostgreSQL refuses these message types beyond 10000 bytes (PQ_SMALL_MESSAGE_LIMIT).
_SMALL_LIMIT: Final = 10_000
_SMALL_ONLY: Final = type_table(b"CDEHSXcf")
_LONE_FLUSH: Final = frontend.FLUSH
_QUERY_OR_CALL: Final = type_table(b"QF")
# What most clients hold, shared rather than allocated per client (10,000 idle clients
# are 10,000 copies of each): they are only ever replaced, never changed in place.
_NO_PINS: Final[frozenset[str]] = frozenset()
_NO_SETTINGS: Final[Mapping[str, str]] = {}


def _parse_query_end(data: bytes, start: int, end: int) -> int:
    """Where the SQL of a Parse starting at `start` ends (its NUL), -1 if nowhere.

    Most Parse messages declare no parameter types: they end with the SQL's NUL and a
    zero count, which their last three bytes and one `int in bytes` (a memchr over a
    copy of the SQL) confirm. bytes.find with bounds costs more in parsing its
    arguments than in searching.
    """
    no_types = end - start >= 3 and data[end - 3] == 0 and data[end - 2] == 0 and data[end - 1] == 0
    if no_types and 0 not in data[start : end - 3]:
        return end - 3
    return data.find(b"\x00", start, end)


class _Violation(Exception):
    """A client message the proxy cannot frame or read: the client is dropped with 08P01."""


# What reading a lying message can raise deeper down (a name not NUL-terminated or not
# UTF-8, a body shorter than its fields): the same violation.
_MALFORMED: Final = (ProtocolError, IndexError, ValueError)


class ClientState(enum.Enum):
    STARTUP = "startup"
    LOGIN = "login"
    IDLE = "idle"  # logged in, no server
    WAITING = "waiting"  # in pool.waiting
    ACTIVE = "active"  # linked to a server
    CLOSED = "closed"


class ClientError(Exception):
    """Ends a client's login with an ErrorResponse (FATAL) carrying this SQLSTATE."""

    def __init__(self, code: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class _PasswordExchange:
    """What a client's password exchange remembers between its messages: the method, the
    secret on record (None: unknown user or no password, so it fails at its end), md5's
    salt, SCRAM's server side; and, run inline, the startup packet's tracked parameters."""

    __slots__ = ("method", "salt", "scram", "scram_started", "secret", "startup_params")

    def __init__(self, method: AuthType, secret: str | None) -> None:
        self.method = method
        self.secret = secret
        self.salt = b""
        self.scram: auth.ScramServerExchange | None = None
        self.scram_started = False  # SASLInitialResponse taken: SASLResponse comes next
        self.startup_params: dict[str, str] = {}


def _sasl_initial_response(body: bytes) -> bytes:
    """The client-first message of a SASLInitialResponse naming SCRAM-SHA-256."""
    mechanism_end = body.find(b"\x00")
    if mechanism_end < 0 or len(body) < mechanism_end + 5:
        raise ProtocolError("malformed SASLInitialResponse")
    mechanism = body[:mechanism_end].decode(errors="replace")
    if mechanism != auth.SCRAM:
        raise ClientError(sqlstate.PROTOCOL_VIOLATION, f"unsupported SASL mechanism: {mechanism}")
    length = int.from_bytes(body[mechanism_end + 1 : mechanism_end + 5], "big", signed=True)
    client_first = body[mechanism_end + 5 :]
    if length != len(client_first):
        raise ProtocolError("malformed SASLInitialResponse length")
    return client_first


class _Startup:
    """What a StartupMessage says, as a login reads it under one config: its user and
    database, its tracked parameters and other settings, the NegotiateProtocolVersion it
    asks for. It depends on the packet's bytes and the config alone, so it is read once
    per distinct packet (_STARTUPS): a storm's clients send the same packet again and
    again. Shared by those clients, so never changed in place. The checks that depend on
    the moment (TLS, draining, the client limit) are _begin_login's, at every login."""

    __slots__ = ("config", "database", "error", "negotiation", "sets", "tracked", "user")

    def __init__(self, config: PoolerConfig, packet: StartupMessage) -> None:
        self.config = config
        # Interned: the clients of one user and database share the strings.
        self.user = sys.intern(packet.user)
        self.database = sys.intern(packet.database)
        # As PostgreSQL: go on with 3.0, naming the protocol options not taken.
        self.negotiation = (
            backend.negotiate_protocol_version(0, packet.protocol_options) if packet.needs_negotiation else b""
        )
        # A setting the login cannot go on with: refused after the other checks, as before
        # this reading was kept (never kept itself).
        self.error: ClientError | None = None
        self.tracked: dict[str, str] = {}
        self.sets: Mapping[str, str] = _NO_SETTINGS
        try:
            self.tracked, self.sets = _startup_params(packet.params, config.ignore_startup_parameters)
        except ClientError as exc:
            self.error = exc


# Startup packets read (bytes -> their reading). Bounded: clients that each send another
# packet (an application_name per process) empty it now and then rather than grow it.
_STARTUPS: Final[dict[bytes, _Startup]] = {}
_STARTUPS_LIMIT: Final = 256
_STARTUP_KEY_LIMIT: Final = 1024  # longer packets are read each time rather than kept


def _startup_params(startup: dict[str, str], ignore: list[str]) -> tuple[dict[str, str], Mapping[str, str]]:
    """The tracked parameters of a startup packet, and its other settings.

    Settings drivers send at startup (node-postgres' statement_timeout, libpq's
    `options=-c ...`) are set on every server the client gets and reset when it leaves
    it (see `link`, Pool.release); names in ignore_startup_parameters are dropped, as
    PgBouncer does.
    """
    tracked: dict[str, str] = {}
    others: dict[str, str] = {}
    ignored = {name.lower() for name in ignore}
    settings: list[tuple[str, str]] = []
    for name, value in startup.items():
        lower = name.lower()
        if name in ("user", "database") or lower in ignored:
            continue
        if lower == "options":
            try:
                settings.extend(params.split_options(value))
            except ValueError as exc:
                raise ClientError(sqlstate.FEATURE_NOT_SUPPORTED, f"pgfleet: {exc}") from None
        elif lower == "replication" or lower.startswith("_pq_."):
            raise ClientError(sqlstate.PROTOCOL_VIOLATION, f"unsupported startup parameter: {name}")
        else:
            settings.append((name, value))
    for name, value in settings:
        canonical = params.canonical(name)
        if canonical is not None:
            tracked[canonical] = value
        elif name.lower() not in ignored:
            others[name.lower()] = value
    return tracked, (others or _NO_SETTINGS)


def _read_startup(config: PoolerConfig, body: bytes, packet: StartupMessage) -> _Startup:
    """The reading of a StartupMessage, kept for the next client that sends these bytes."""
    startup = _Startup(config, packet)
    if startup.error is None and len(body) <= _STARTUP_KEY_LIMIT:
        if len(_STARTUPS) >= _STARTUPS_LIMIT:
            _STARTUPS.clear()
        _STARTUPS[body] = startup
    return startup


class _Login:
    """What a client holds only while it logs in: dropped with it at ReadyForQuery (10,000
    idle clients would otherwise carry 10,000 sets of empty fields)."""

    __slots__ = ("database", "opened", "password", "reader", "task", "user", "waiter")

    def __init__(self) -> None:
        # The startup packet's user and database; once logged in the pool's (see
        # ClientConnection.user).
        self.user = ""
        self.database = ""
        self.reader: StartupReader | MessageReader | None = StartupReader()
        # A first packet has been read: a TLS handshake record can only open the connection.
        self.opened = False
        # The login's task, once it has to wait for something (see _login_inline), under
        # its own client_login_timeout; until then the pooler's one timer ends the login
        # at its deadline (Pooler._sweep_logins).
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        # A password exchange run inline (see _login_inline), between the client's messages.
        self.password: _PasswordExchange | None = None


class _LongMessage:
    """A long message still coming in: its chunks, joined once it is whole (`chunks`), or,
    passed straight through to the server as it comes (`chunks` None), only its count."""

    __slots__ = ("chunks", "rest")

    def __init__(self, chunks: list[bytes] | None, rest: int) -> None:
        self.chunks = chunks
        self.rest = rest  # its bytes still to come


class _Aside:
    """What few clients have, kept apart so that the others do not carry its fields: created
    on the first need (a TLS upgrade, a unix socket, startup settings to pass on, a forced
    user, a long message)."""

    __slots__ = ("long", "peer", "startup_sets", "tls", "user")

    def __init__(self) -> None:
        self.tls = ""  # "TLSv1.3/<cipher>" once upgraded (SHOW CLIENTS)
        # The peer's address where the transport cannot tell it after the close (a TLS
        # transport forgets it; a unix socket has none).
        self.peer: tuple[str, int] | None = None
        # Startup settings other than the tracked parameters (name -> value).
        self.startup_sets: Mapping[str, str] = _NO_SETTINGS
        # The user logged in as, where the pool's is another (a database's forced user).
        self.user = ""
        self.long: _LongMessage | None = None  # a long message being received


class ClientConnection:
    """The asyncio protocol of one client connection (an asyncio.Protocol in all but name:
    not derived from it, so that the compiled build's object carries no __dict__ and
    __weakref__ pointers, which a class derived from a Python class has; see `as_protocol`)."""

    __slots__ = (
        "_aside",
        "_logging_in",
        "_pending",
        "_reading_paused",
        "_sets_checked",
        "_write_paused",
        "_yielding",
        "batch_binds",
        "cancel_pid",
        "cancel_secret",
        "close_at_boundary",
        "connect_time",
        "id",
        "is_admin",
        "last_activity",
        "maps_statements",
        "params",
        "pins",
        "pool",
        "pooler",
        "request_time",
        "server",
        "state",
        "statements",
        "transport",
        "unsynced",
        "wait_notified",
    )

    def __init__(self, pooler: Pooler, unix: bool = False) -> None:
        """`unix`: accepted on a unix socket, whose peer has no address."""
        # The flags first: the compiled build lays fields out in this order, and its
        # one-byte flags packed together take one word instead of one each.
        self.is_admin = False
        self.wait_notified = False  # query_wait_notify's NOTICE went out in this wait
        # An extended-protocol message went out and its Sync has not yet.
        self.unsynced = False
        self.close_at_boundary = False
        self.maps_statements = False  # set per link: transaction/statement mode, cache on
        self._sets_checked = False  # PostgreSQL has accepted the startup settings once
        self._reading_paused = False
        self._write_paused = False
        self._yielding = False  # reading paused until the loop's next turn (turns.py)
        self.pooler = pooler
        self.id = next(pooler.client_ids)
        self.state = ClientState.STARTUP
        self.transport: asyncio.Transport | None = None
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        # The tracked parameters as this client sees them: shared by clients that see the
        # same (Pool.shared_params), so replaced on change, never changed in place.
        self.params: Mapping[str, str] = _NO_SETTINGS
        # BackendKeyData's two numbers (Int32 each): fields rather than a tuple, as the
        # `cancel_key` property gives them; the compiled build keeps both in one word.
        self.cancel_pid: i32 = 0
        self.cancel_secret: i32 = 0
        now = pooler.loop.time()
        self.connect_time = now
        self.last_activity = now
        self.request_time = now
        # Named prepared statements: client name -> shared server-side statement.
        self.statements = prepared.NO_STATEMENTS  # shared until its first (prepared.on_parse)
        # Server names bound since the last Sync (a stale plan among them gets renewed).
        self.batch_binds: list[str] | None = None
        # Why this client keeps its server past transaction end (sqlscan's reasons).
        self.pins = _NO_PINS
        self._pending = b""
        self._logging_in: _Login | None = _Login()  # None once logged in
        self._aside: _Aside | None = None  # see _Aside
        if unix:
            self._set_aside().peer = ("unix", 0)

    @property
    def cancel_key(self) -> tuple[int, int]:
        """(process id, secret key) of BackendKeyData; (0, 0) until logged in."""
        return self.cancel_pid, self.cancel_secret

    @cancel_key.setter
    def cancel_key(self, key: tuple[int, int]) -> None:
        self.cancel_pid, self.cancel_secret = key

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the peer; ("unix", 0) over a unix socket. Not kept by the client:
        asked of the transport when needed (uvloop asks the kernel at the first question, two
        system calls a storm's login without hba or log lines never makes), which keeps the
        answer, also after the close. Asked first after the close, a transport may not
        know: ("", 0) (the logout line's address is asked for at the welcome, see _welcome)."""
        aside = self._aside
        if aside is not None and aside.peer is not None:
            return aside.peer
        transport = self.transport
        try:
            peer = transport.get_extra_info("peername") if transport is not None else None
        except (AttributeError, OSError):
            peer = None  # (uvloop's transport, closed before the question)
        if isinstance(peer, tuple):
            return str(peer[0]), int(peer[1])
        if isinstance(peer, str):
            return "unix", 0  # a unix socket's peer: ""
        return "", 0

    @property
    def user(self) -> str:
        """The user this client logs in or logged in as ("" before its startup packet)."""
        login = self._logging_in
        if login is not None:
            return login.user
        aside = self._aside
        if aside is not None and aside.user:
            return aside.user
        pool = self.pool
        return pool.user if pool is not None else ""

    @property
    def database(self) -> str:
        """The database this client logs in or logged in to (its pool's: not kept twice)."""
        login = self._logging_in
        if login is not None:
            return login.database
        pool = self.pool
        return pool.database if pool is not None else ""

    @property
    def wait_start(self) -> float:
        """When this client began to wait for a server (Pool.acquire), while it waits."""
        return self.request_time

    @property
    def peer_host(self) -> str:
        return self.address[0]

    @property
    def tls(self) -> str:
        """ "TLSv1.3/<cipher>" once upgraded (SHOW CLIENTS); "" in the clear."""
        aside = self._aside
        return aside.tls if aside is not None else ""

    @property
    def startup_sets(self) -> Mapping[str, str]:
        """Startup settings other than the tracked parameters (name -> value)."""
        aside = self._aside
        return aside.startup_sets if aside is not None else _NO_SETTINGS

    def _receiving_long(self) -> bool:
        aside = self._aside
        return aside is not None and aside.long is not None

    def _set_aside(self) -> _Aside:
        aside = self._aside
        if aside is None:
            aside = self._aside = _Aside()
        return aside

    # -- asyncio.Protocol ----------------------------------------------------------------
    def as_protocol(self) -> asyncio.Protocol:
        """This object as the event loop's protocol (uvloop and asyncio call its methods,
        they do not check its class)."""
        return cast(asyncio.Protocol, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if not self.pooler.client_connected(self):  # (which also times its login)
            self.terminate(sqlstate.PROTOCOL_VIOLATION, _NO_MORE_CONNECTIONS)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is ClientState.ACTIVE:
            self.last_activity = self.pooler.clock()
            if len(data) >= turns.YIELD_AFTER:  # a long read ends this client's turn
                turns.yield_turn(self, self.pooler.loop.call_soon)
            aside = self._aside
            long = aside.long if aside is not None else None
            if long is not None:
                data = self._long_message(long, data)
                if not data:
                    return
            elif self._pending:
                data, self._pending = self._pending + data, b""
            self._forward(data)
        elif state is ClientState.IDLE:
            now = self.last_activity = self.pooler.clock()
            # Nothing pending is the rule: the read itself is kept (compiled, += always copies).
            self._pending = self._pending + data if self._pending else data
            self._need_server(now)
        elif state is ClientState.WAITING:
            self.last_activity = self.pooler.clock()
            self._pending = self._pending + data if self._pending else data
            if len(self._pending) > _QUEUED_BUFFER_LIMIT:
                self.pause_reading()
        elif state is not ClientState.CLOSED:
            self._pending = self._pending + data if self._pending else data
            login = self._logging_in
            assert login is not None  # (logged in and not IDLE: the admin console's session)
            if login.task is None:
                if state is ClientState.STARTUP:
                    self._login_inline()
                    return
                if login.password is not None:
                    self._password_inline()  # the next step of a password exchange begun inline
                    return
            waiter = login.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself (asyncio.Protocol's default)

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = ClientState.CLOSED
        login = self._logging_in
        if login is not None:
            if login.task is not None and not login.task.done():
                login.task.cancel()
            waiter = login.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        server, self.server = self.server, None
        if server is not None and self.pool is not None:
            server.client = None
            if self.pins:
                # LISTEN, SET, a lock, a cursor or a temp table stays on that backend.
                server.close_needed = True
            prepared.client_left(server)
            self.pool.release(server, self.unsynced)
        self.pooler.client_disconnected(self, previous)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: its server is not read."""
        return self._write_paused

    def pause_writing(self) -> None:
        # The client reads slower than its server answers: stop reading the server.
        self._write_paused = True
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None:
            self.server.resume_reading()

    # -- login ---------------------------------------------------------------------------
    def _login_inline(self) -> None:
        """The login as far as it goes without waiting, run from data_received.

        A storm's login (startup packet, trust, a pool that has its server's parameters)
        completes here: no task, no future, no timeout context. What has to wait (a TLS
        handshake, a password, auth_query, the pool's first server, the admin console)
        goes on in a task from where this stopped; after a TLS handshake the login comes
        back here.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        login = self._logging_in
        assert login is not None
        reader = login.reader
        assert isinstance(reader, StartupReader)
        tls_context = self.pooler.client_tls_context
        try:
            while self._pending:
                if not login.opened and tls_context is not None and self._pending[:1] == _TLS_HANDSHAKE:
                    # PostgreSQL 17's direct negotiation: a ClientHello opens the connection.
                    self._hand_off_tls(tls_context, direct=True)
                    return
                data, self._pending = self._pending, b""
                got = reader.feed(data)
                if got is None:
                    return
                login.opened = True
                body, self._pending = got
                if tls_context is None and body == _SSL_REQUEST_BODY:
                    transport.write(b"N")  # no TLS here: go on in the clear
                    continue
                startup = _STARTUPS.get(body)  # a packet read before: not parsed again
                if startup is not None and startup.config is self.pooler.config:
                    break
                packet = parse_startup_packet(body)
                if isinstance(packet, SSLRequest) and tls_context is not None and not self.tls:
                    self._hand_off_tls(tls_context, direct=False)
                    return
                # Two tests: compiled, each a type check, where a union is made per call.
                if isinstance(packet, SSLRequest) or isinstance(packet, GSSENCRequest):  # noqa: SIM101
                    transport.write(b"N")  # go on in the clear (or give up)
                    continue
                if isinstance(packet, CancelRequest):
                    self.pooler.forward_cancel(packet.process_id, packet.secret_key)
                    transport.close()
                    return
                assert isinstance(packet, StartupMessage)
                startup = _read_startup(self.pooler.config, body, packet)
                break
            else:
                return  # all read (an SSLRequest answered): the startup packet comes next
            assert startup is not None
            startup_params = self._begin_login(startup)
            if self.database == _ADMIN_DATABASE:
                self._hand_off(startup_params, None)
                return
            begun = self._authenticate_inline()
            if begun is None:
                self._hand_off(startup_params, None)
                return
            if isinstance(begun, _PasswordExchange):
                begun.startup_params = startup_params
                login.password = begun
                login.reader = None  # (see _login_message)
                return  # the client's answer comes to data_received
            self._logged_in_inline(startup_params, begun)
        except Exception as exc:
            self._login_failed(exc)

    def _password_inline(self) -> None:
        """The next client message of a password exchange begun inline (SCRAM takes two)."""
        login = self._logging_in
        transport = self.transport
        if login is None or login.password is None or transport is None or transport.is_closing():
            return
        exchange = login.password
        try:
            message = self._login_message()
            if message is None:
                return
            msg_type, body = message  # (compiled: *message would build a list and a tuple)
            greeting = self._auth_step(exchange, msg_type, body)
            if greeting is None:
                return
            login.password = None
            self._logged_in_inline(exchange.startup_params, greeting)
        except Exception as exc:
            login.password = None
            self._login_failed(exc)

    def _logged_in_inline(self, startup_params: dict[str, str], greeting: bytes) -> None:
        """Authenticated inline: the welcome, unless the pool has yet to learn its server's parameters."""
        pool = self._login_pool(greeting)
        welcome = pool.server_params
        if welcome is None:
            self._hand_off(startup_params, greeting)
            return
        self._welcome(pool, welcome, startup_params, greeting)

    def _hand_off(self, startup_params: dict[str, str], greeting: bytes | None) -> None:
        """Go on with the login in a task, within what is left of client_login_timeout."""
        login = self._logging_in
        assert login is not None
        remaining = self._login_time_left()
        login.task = self.pooler.loop.create_task(self._run_handshake(startup_params, greeting, remaining))

    def _hand_off_tls(self, context: ssl.SSLContext, direct: bool) -> None:
        """The TLS handshake in a task (it waits for the client); the login then comes back inline.

        The task is given the context TLS was offered with: a RELOAD that turns client TLS
        off before the task's first step must not leave the client half way.
        """
        login = self._logging_in
        assert login is not None
        remaining = self._login_time_left()
        login.task = self.pooler.loop.create_task(self._run_tls(context, direct, remaining))

    def _login_time_left(self) -> float | None:
        """What is left of client_login_timeout for this login (None: no limit)."""
        limit = self.pooler.login_timeout
        if not limit:
            return None
        return max(0.0, limit - (self.pooler.clock() - self.connect_time))

    def logging_in_inline(self) -> bool:
        """Logging in without a task of its own: the pooler's client_login_timeout timer
        is the one to end it (Pooler._sweep_logins)."""
        login = self._logging_in
        # (An admin console session keeps its _Login: its cancel key says it is logged in.)
        return login is not None and login.task is None and not self.cancel_pid and self.state is not ClientState.CLOSED

    def login_timed_out(self) -> None:
        self.terminate(sqlstate.PROTOCOL_VIOLATION, "client_login_timeout (server down or wrong password?)")

    def take_login_leftover(self) -> bytes:
        """Logged in to the admin console: the bytes read past the login. The console's
        session reads the client from here on, waiting as the login did (_wait_for_data)."""
        login = self._logging_in
        assert login is not None
        reader, login.reader = login.reader, None
        return reader.take_raw() if isinstance(reader, MessageReader) else b""

    def _login_failed(self, exc: Exception) -> None:
        if isinstance(exc, ClientError):
            self.terminate(exc.code, str(exc), exc.detail)
        elif isinstance(exc, StartupLengthError):
            log.info("client %s:%s: %s", *self.address, exc)
            self.close()  # as PostgreSQL: no ErrorResponse to what is not a startup packet
        elif isinstance(exc, ProtocolError):
            self.terminate(exc.code, str(exc))
        elif isinstance(exc, ServerLoginError):
            self.fatal_fields(exc.fields)
        else:
            log.error("unexpected error during login of client %s", self.address, exc_info=exc)
            self.terminate(sqlstate.INTERNAL_ERROR, "pgfleet: internal error during login")

    async def _run_tls(self, context: ssl.SSLContext, direct: bool, timeout: float | None) -> None:
        """Upgrade to TLS (after SSLRequest, or `direct`: the client opened with its
        ClientHello), then hand the login back to _login_inline and the timer."""
        login = self._logging_in
        assert login is not None
        try:
            async with asyncio.timeout(timeout):
                if direct:
                    await self._direct_tls(context)
                else:
                    await self._start_tls(context)
        except TimeoutError:
            self.terminate(sqlstate.PROTOCOL_VIOLATION, "client_login_timeout (server down or wrong password?)")
            return
        except Exception as exc:
            self._login_failed(exc)
            return
        finally:
            login.task = None
        if self.state is not ClientState.STARTUP:
            return
        self.pooler.login_resumed(self)
        if self._pending:
            self._login_inline()  # the startup packet came with the handshake's end

    async def _run_handshake(
        self, startup_params: dict[str, str], greeting: bytes | None, timeout: float | None
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                if greeting is None:
                    await self._login_rest(startup_params)
                else:
                    await self._login_after_auth(startup_params, greeting)
        except TimeoutError:
            self.terminate(sqlstate.PROTOCOL_VIOLATION, "client_login_timeout (server down or wrong password?)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._login_failed(exc)
        finally:
            if self._logging_in is not None:
                self._logging_in.task = None

    async def _read_message(self) -> tuple[int, bytes]:
        while True:
            message = self._login_message()
            if message is not None:
                return message
            await self._wait_for_data()

    def _login_message(self) -> tuple[int, bytes] | None:
        """The client's next message during login (a password), once it is whole."""
        login = self._logging_in
        assert login is not None
        reader = login.reader
        data, self._pending = self._pending, b""
        if not isinstance(reader, MessageReader):
            # The usual answer, one whole message in one read, is sliced from it: a reader
            # (a buffer, a list) is made only for one that comes in pieces or with more.
            if len(data) >= 5:
                length = (data[1] << 24) | (data[2] << 16) | (data[3] << 8) | data[4]
                if 4 <= length <= _SMALL_LIMIT and len(data) == 1 + length:
                    return data[0], data[5:]
            reader = login.reader = MessageReader(max_length=_SMALL_LIMIT)
        reader.feed(data)
        messages = reader.messages()
        if not messages:
            return None
        if len(messages) > 1:
            raise ProtocolError("unexpected message during authentication")
        return messages[0]

    async def _wait_for_data(self) -> None:
        login = self._logging_in
        if self.state is not ClientState.CLOSED and login is not None:
            login.waiter = self.pooler.loop.create_future()
            await login.waiter
            login.waiter = None
        if self.state is ClientState.CLOSED:  # before, or while this coroutine waited
            raise asyncio.CancelledError

    def _begin_login(self, startup: _Startup) -> dict[str, str]:
        """Checks on the startup packet before authentication; returns its tracked parameters."""
        assert self.transport is not None
        if startup.negotiation:
            self.transport.write(startup.negotiation)
        if self.pooler.client_tls_demanded and not self.tls and self.peer_host != "unix":
            raise ClientError(sqlstate.INVALID_AUTHORIZATION, "SSL required")
        self.state = ClientState.LOGIN
        login = self._logging_in
        assert login is not None
        login.user, login.database = startup.user, startup.database
        if self.pooler.draining and self.database != _ADMIN_DATABASE:
            raise ClientError(sqlstate.CANNOT_CONNECT_NOW, "pgfleet is shutting down")
        if self.database != _ADMIN_DATABASE and self.pooler.over_client_limit():
            # Every connection counts, logging in or not. PgBouncer's text and code (its
            # disconnect_client() default, 08P01): clients and alerts written for it match.
            self.pooler.client_limit_hit()
            raise ClientError(sqlstate.PROTOCOL_VIOLATION, _NO_MORE_CONNECTIONS)
        if startup.error is not None:
            raise startup.error
        if startup.sets:
            self._set_aside().startup_sets = startup.sets
        return startup.tracked

    async def _login_rest(self, startup_params: dict[str, str]) -> None:
        """Authentication and the welcome (or the admin console)."""
        assert self.transport is not None
        if self.database == _ADMIN_DATABASE:
            if self.user == _ADMIN_DATABASE and self._peer_is_this_os_user():
                # PgBouncer's peer rule: user pgbouncer over the unix socket, from the OS user
                # running the pooler, is an admin without a password or admin_users.
                self.is_admin = True
                self.transport.write(_AUTH_OK)
            else:
                self.transport.write(await self._authenticate())
            await self.pooler.admin_login(self)
            return
        # Authenticated first: an unknown database must not be told apart before the password.
        await self._login_after_auth(startup_params, await self._authenticate())

    async def _login_after_auth(self, startup_params: dict[str, str], greeting: bytes) -> None:
        """`greeting`: AuthenticationOk (after SCRAM, with SASLFinal), not sent yet."""
        assert self.transport is not None
        pool = self._login_pool(greeting)
        welcome = pool.server_params
        if welcome is None:
            self.transport.write(greeting)  # the client hears it is in while the pool connects
            greeting = b""
            welcome = await pool.welcome_params()
        self._welcome(pool, welcome, startup_params, greeting)

    def _login_pool(self, greeting: bytes) -> Pool:
        """The pool of an authenticated client's database and user (ClientError: none for it)."""
        assert self.transport is not None
        database = self.database
        try:
            pool = self.pooler.login_pool(database, self.user)
            if pool is None:
                raise ClientError(sqlstate.INVALID_CATALOG_NAME, f'no such database: "{database}"')
            if database in self.pooler.disabled_databases:
                raise ClientError(sqlstate.PROTOCOL_VIOLATION, f"database does not allow connections: {database}")
        except ClientError:
            self.transport.write(greeting)  # as PostgreSQL: authenticated, then refused
            raise
        return pool

    def _welcome(self, pool: Pool, welcome: dict[str, str], startup_params: dict[str, str], greeting: bytes) -> None:
        """Logged in: AuthenticationOk (unless sent), ParameterStatus, BackendKeyData and
        ReadyForQuery in one write, as PostgreSQL flushes them."""
        transport = self.transport
        assert transport is not None
        refused = self.pooler.client_refused(self.database, self.user)
        if refused is not None:
            transport.write(greeting)
            raise ClientError(sqlstate.TOO_MANY_CONNECTIONS, refused)
        self.pool = pool
        self.params, frames = pool.client_welcome(startup_params)
        self.cancel_pid, self.cancel_secret = self.pooler.register_cancel_key(self)
        key_data = backend.backend_key_data(self.cancel_pid, self.cancel_secret)
        transport.write(b"".join((greeting, frames, key_data, _READY_IDLE)))
        login = self._logging_in
        assert login is not None
        if login.user != pool.user:  # a database's forced user: the pool's is another
            self._set_aside().user = login.user
        self._logging_in = None
        self.state = ClientState.IDLE
        pool.client_logged_in(self, login.user)
        if self.pooler.log_connections:
            log.info("login: %s@%s from %s:%s", self.user, self.database, *self.address)
        elif self.pooler.log_disconnections:
            self.address  # noqa: B018  (asked while the transport knows it: the logout line says it)
        if self._pending:
            self._need_server(self.pooler.clock())

    async def _direct_tls(self, ctx: ssl.SSLContext) -> None:
        """A first byte that opens a TLS handshake is PostgreSQL 17's direct negotiation:
        the handshake starts at once, and only a client naming ALPN `postgresql` goes on."""
        hello, self._pending = self._pending, b""
        await self._start_tls(ctx, hello)
        assert self.transport is not None
        if not tls.alpn_agreed(self.transport):
            raise ClientError(
                sqlstate.PROTOCOL_VIOLATION,
                "received direct SSL connection request without ALPN protocol negotiation extension",
            )

    async def _start_tls(self, ctx: ssl.SSLContext, hello: bytes = b"") -> None:
        """SSLRequest (or a direct ClientHello, `hello`): upgrade this connection in place."""
        if self._pending:
            # Bytes sent before the handshake cannot have come through it (CVE-2021-23214).
            raise ClientError(sqlstate.PROTOCOL_VIOLATION, "received unencrypted data after SSL request")
        assert self.transport is not None
        pooler = self.pooler
        peer = self.address  # a TLS transport forgets it at the close
        try:
            self.transport = await tls.upgrade_client(
                pooler.loop, self.transport, self.as_protocol(), ctx, pooler.tls_stats, pooler.config.client_login_timeout or None,
                hello,
            )  # fmt: skip
        except (OSError, TimeoutError) as exc:
            log.info("TLS handshake with client %s:%s failed: %s", *peer, exc)
            self.transport.abort()
            if self.state is not ClientState.CLOSED:
                self.connection_lost(exc)
            raise asyncio.CancelledError from None
        aside = self._set_aside()
        aside.tls = tls.describe(self.transport)
        aside.peer = peer

    def _peer_is_this_os_user(self) -> bool:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return False
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return False
        _pid, uid, _gid = struct.unpack("3i", creds)
        return bool(uid == os.getuid())

    def _authenticate_inline(self) -> bytes | _PasswordExchange | None:
        """AuthenticationOk when this login needs no password (trust); the exchange begun
        when it needs one that auth_file holds (its request is sent); None when it has to
        look the user up first (auth_query: then _authenticate goes on in a task)."""
        pooler = self.pooler
        method = pooler.auth_type
        if method is _HBA:
            method = self._hba_method()
        secret = pooler.userlist.get(self.user)
        if secret is None and pooler.auth_user and method is not _ANY:
            return None  # auth_query may know the user
        return self._auth_begin(method, secret)

    async def _authenticate(self) -> bytes:
        """Check the client; returns AuthenticationOk (after SCRAM with SASLFinal) to send
        with the welcome, as PostgreSQL flushes them together."""
        config = self.pooler.config
        method = config.auth_type
        if method is _HBA:
            method = self._hba_method()
        user = self.user
        secret = self.pooler.userlist.get(user)
        if (
            secret is None
            and config.auth_user
            and method is not _ANY
            and self.database != _ADMIN_DATABASE
            and config.database(config.auth_dbname or self.database) is not None  # (else: mock, then refused)
        ):
            secret = await self.pooler.credentials.lookup(user, self.database)  # auth_query
        begun = self._auth_begin(method, secret)
        while isinstance(begun, _PasswordExchange):
            msg_type, body = await self._read_message()
            greeting = self._auth_step(begun, msg_type, body)
            if greeting is not None:
                return greeting
        return begun

    def _auth_begin(self, method: AuthType, secret: str | None) -> bytes | _PasswordExchange:
        """AuthenticationOk when `method` asks for no password; else the password exchange
        begun (its request sent), which `_auth_step` carries on with each client message."""
        transport = self.transport
        assert transport is not None
        if method is _ANY:
            return _AUTH_OK
        if method is _TRUST:
            if secret is None and self.pooler.auth_file:
                raise ClientError(sqlstate.INVALID_AUTHORIZATION, f'no such user: "{self.user}"')
            return _AUTH_OK
        # A user not in auth_file, or with an empty password, is asked for a password
        # like any other and refused once it is given, as a wrong one: the answer must
        # not tell which user names exist (PostgreSQL's mock authentication), and an
        # empty password never logs in (PgBouncer).
        known = secret or None
        if method is _PLAIN:
            transport.write(backend.authentication_cleartext())
            return _PasswordExchange(_PLAIN, known)
        if method is _MD5 and (known is None or not auth.is_scram(known)):
            exchange = _PasswordExchange(_MD5, known)
            exchange.salt = os.urandom(4)
            transport.write(backend.authentication_md5(exchange.salt))
            return exchange
        # SCRAM-SHA-256 (also md5 against a SCRAM secret, as PostgreSQL); without a
        # secret, a mock exchange that fails at its end.
        exchange = _PasswordExchange(_SCRAM, known)
        try:
            exchange.scram = (
                auth.ScramServerExchange.for_secret(known)
                if known is not None
                else auth.ScramServerExchange.mock(self.user)
            )
        except auth.AuthFailed as exc:
            log.warning("cannot authenticate %s with SCRAM: %s", self.user, exc)
            raise self._auth_failed() from None
        transport.write(_AUTH_SASL)
        return exchange

    def _auth_step(self, exchange: _PasswordExchange, msg_type: int, body: bytes) -> bytes | None:
        """One client message of a password exchange: the greeting once the client is in
        (AuthenticationOk, after SCRAM with SASLFinal: not sent yet), None while the
        exchange goes on (its next request sent); ClientError when the password is wrong."""
        if msg_type != _PASSWORD:
            raise ProtocolError(f"expected password message, got {chr(msg_type)!r}")
        known = exchange.secret
        if exchange.method is _PLAIN:
            if known is None or not auth.check_plain_password(self.user, known, body.rstrip(b"\x00")):
                raise self._auth_failed()
            return _AUTH_OK
        if exchange.method is _MD5:
            given = body.rstrip(b"\x00")
            if known is None or not auth.check_md5_password(self.user, known, exchange.salt, given):
                raise self._auth_failed()
            return _AUTH_OK
        scram = exchange.scram
        assert scram is not None and self.transport is not None
        try:
            if not exchange.scram_started:
                client_first = _sasl_initial_response(body)
                exchange.scram_started = True
                self.transport.write(backend.authentication_sasl_continue(scram.first(client_first)))
                return None
            server_final = scram.final(body)
        except auth.AuthFailed as exc:
            log.info("SCRAM authentication of %s failed: %s", self.user, exc.__cause__ or exc)
            raise self._auth_failed() from None
        if known is not None:  # (a mock exchange never gets this far)
            self.pooler.credentials.learned(self.user, known, scram.client_key)  # SCRAM pass-through
        return backend.authentication_sasl_final(server_final) + _AUTH_OK

    def _hba_method(self) -> AuthType:
        """auth_type hba: this connection's method, from the first auth_hba_file rule that matches."""
        tls_in_use = bool(self.tls)
        found = hba.method_for(self.pooler.hba, self.database, self.user, self.peer_host, tls_in_use)
        if found is None or found == "reject":
            encryption = "SSL encryption" if tls_in_use else "no encryption"
            what = "no auth_hba_file entry" if found is None else "auth_hba_file rejects connection"
            raise ClientError(
                sqlstate.INVALID_AUTHORIZATION,
                f'{what} for host "{self.peer_host}", user "{self.user}", database "{self.database}", {encryption}',
            )
        if found == "cert":
            # The client certificate (checked against client_tls_ca_file) names the user.
            peer = self.transport.get_extra_info("peercert") if self.transport is not None else None
            names = [value for rdn in (peer or {}).get("subject", ()) for key, value in rdn if key == "commonName"]
            if self.user not in names:
                raise ClientError(
                    sqlstate.INVALID_AUTHORIZATION, f'certificate authentication failed for user "{self.user}"'
                )
            return _ANY
        return _HBA_METHODS[found]

    def _auth_failed(self) -> ClientError:
        return ClientError(sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"')

    # -- hot path ---------------------------------------------------------------------------
    def _need_server(self, now: float) -> None:
        """IDLE with bytes pending: get a server (or close on Terminate); `now` is the loop's time."""
        pending = self._pending
        if len(pending) < 5:
            return
        if pending[0] == _X:
            self.close()
            return
        if pending == _LONE_FLUSH:
            # A lone Flush asks nothing of a server.
            self._pending = b""
            return
        pool = self.pool
        assert pool is not None
        self.request_time = self.last_activity
        self.state = ClientState.WAITING
        pool.acquire(self, now)
        if self.state is ClientState.WAITING and len(self._pending) > _QUEUED_BUFFER_LIMIT:
            self.pause_reading()

    def link(self, server: ServerConnection) -> None:
        """The pool hands this client a server: sync its session, send what waited."""
        self.server = server
        server.client = self
        self.state = ClientState.ACTIVE
        pool = self.pool
        assert pool is not None
        self.maps_statements = pool.maps_statements
        sync = None
        client_params = self.params
        if server.synced_params is not client_params:
            if client_params != server.tracked_params:
                sync = params.sync_statement(client_params, server.params)
            else:
                server.synced_params = client_params  # the next link of these params: an identity test
        aside = self._aside
        sets = aside.startup_sets if aside is not None else None
        if sets:
            # Reset by Pool.release when the client leaves this server.
            server.startup_sets = tuple(sets)
            sync = (sync + ";" if sync else "") + params.set_config_statement(sets)
        if self._write_paused:
            server.pause_reading()
        self.resume_reading()
        if sync is not None:
            if sets and not self._sets_checked:
                # The first time: a value PostgreSQL refuses ends the login there, as
                # directly, so nothing of the client's runs before it is known.
                self.state = ClientState.WAITING
                self._check_startup_sets(server, sync)
                return
            server.run_internal(sync)
        data, self._pending = self._pending, b""
        if data:
            self._forward(data)

    def _check_startup_sets(self, server: ServerConnection, sync: str) -> None:
        # Apart from link: compiled, a lambda there would cost every link a closure.
        server.run_internal(sync, lambda: self._startup_sets_checked(server))

    def _startup_sets_checked(self, server: ServerConnection) -> None:
        error, server.internal_error = server.internal_error, None
        if self.server is not server or self.state is not ClientState.WAITING:
            return  # gone meanwhile
        if error is not None:
            self.fatal_fields(error)
            return
        self._sets_checked = True
        self.state = ClientState.ACTIVE
        data, self._pending = self._pending, b""
        if data:
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        """Frame complete messages, count the replies they ask for, send them on.

        Messages naming a prepared statement, and SQL that may touch session state, take
        a slower path (prepared.py) that may send other bytes in their place.
        """
        server = self.server
        pool = self.pool
        assert server is not None and pool is not None
        stats = pool.stats
        maps = self.maps_statements
        n = len(data)
        # More of the client's messages: a retry would now come after them (prepared.retryable).
        server.retry = None
        fresh = (
            maps
            and n > 0
            and data[0] == _B
            and not self.unsynced
            and server.outstanding == 0
            and not server.replies
            and server.tx_status == _IDLE
            and not server.busy_internally
        )
        pos = 0
        replies = 0  # ReadyForQuery replies asked for by this chunk
        seg = 0  # start of the client bytes not yet copied to `out`
        out: list[bytes] | None = None
        answered = False
        hold = 0  # length of the incomplete message at the end, once its header is in
        try:
            while n - pos >= 5:
                msg_type = data[pos]
                # Byte by byte: compiled, four native reads, no call and no tuple (as "!I").
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
                if length < 4 or length > MAX_MESSAGE_LENGTH:
                    raise _Violation(f"invalid message length {length}")
                if length > _SMALL_LIMIT and _SMALL_ONLY[msg_type]:
                    raise _Violation(f"invalid message length {length}")
                end = pos + 1 + length
                if end > n:
                    if length <= _STREAM_AFTER:
                        break
                    streamed = self._stream_head(data, pos, end, server, replies)
                    if streamed is None:
                        hold = end - pos  # gathered whole
                        break
                    head, seg_after, replies = streamed
                    if seg_after < 0:
                        break  # framed again with the next chunk, names and all
                    if head is not None:
                        if out is None:
                            out = []
                        out.append(data[seg:pos])
                        out.append(head)
                        seg = seg_after
                    self._set_aside().long = _LongMessage(None, end - n)
                    pos = n
                    break
                new: bytes | None = None
                if msg_type == _Q:
                    if sqlscan.worth_a_look(data, pos + 5, end - 1):
                        new = prepared.on_query(self, server, data[pos + 5 : end], replies, pos == 0 and end == n)
                        if new is prepared.LOCAL_ANSWER:
                            answered = True
                            replies -= 1
                    elif server.replies:
                        prepared.track(server, prepared.SYNC_REPLY, replies)
                    replies += 1
                elif _EXTENDED[msg_type]:
                    self.unsynced = True
                    if msg_type == _P:
                        # PgBouncer's parse and bind counters count tracked named statements only.
                        # The unnamed statement (most drivers' Parse) spares a search.
                        name_end = pos + 5 if data[pos + 5] == 0 else data.find(b"\x00", pos + 5, end)
                        query_end = _parse_query_end(data, name_end + 1, end)
                        if name_end < 0 or query_end < 0 or end - query_end < 3:
                            raise _Violation("invalid message format")
                        if maps and name_end > pos + 5:
                            stats.client_parse_count += 1
                            new = prepared.on_parse(self, server, data[pos + 5 : end], replies)
                        else:
                            prepared.track(server, prepared.PARSE_REPLY, replies)
                            # The SQL alone: a ';' ends many a query, and after it the regex
                            # would look at the parameter types that follow.
                            if sqlscan.worth_a_look(data, name_end + 1, query_end):
                                self._parse_effect(data[name_end + 1 : query_end])
                    elif msg_type == _B:
                        if length < 12:  # two names, three counts
                            raise _Violation("invalid message format")
                        if maps:
                            portal_end = pos + 5 if data[pos + 5] == 0 else data.find(b"\x00", pos + 5, end)
                            if portal_end < 0:
                                raise _Violation("invalid message format")
                            if portal_end < end - 1 and data[portal_end + 1] != 0:
                                stats.bind_count += 1
                                new = prepared.on_bind(self, server, data[pos + 5 : end], portal_end - pos - 5, replies)
                    elif _KIND_AND_NAME[msg_type] and (length < 6 or data[end - 1] != 0):
                        raise _Violation("invalid message format")  # a kind and a name
                    elif msg_type == _C:
                        if maps and data[pos + 5] == _STATEMENT and data[pos + 6] != 0:
                            new = prepared.on_close(self, server, data[pos + 5 : end], replies)
                        else:
                            prepared.track(server, prepared.CLOSE_REPLY, replies)
                    elif msg_type == _D and maps and data[pos + 5] == _STATEMENT and data[pos + 6] != 0:
                        new = prepared.on_describe(self, server, data[pos + 5 : end], replies)
                elif msg_type == _S:
                    server.skipping_to_sync = False  # what follows the Sync is answered again
                    if server.replies or self.batch_binds:
                        binds, self.batch_binds = self.batch_binds, None
                        reply = prepared.Reply(prepared.SYNC, binds=binds) if binds else prepared.SYNC_REPLY
                        prepared.track(server, reply, replies)
                    replies += 1
                    self.unsynced = False
                elif msg_type == _F:
                    if server.replies:
                        prepared.track(server, prepared.SYNC_REPLY, replies)
                    replies += 1
                elif msg_type == _X:
                    if pos:
                        server.outstanding += replies
                        server.write(data[:pos] if out is None else b"".join(out) + data[seg:pos])
                    self.close()
                    return
                elif msg_type == _H:
                    if length != 4:
                        # PostgreSQL would answer it with an error, then ignore all up to
                        # a Sync: a server deaf in a way no reply count shows.
                        raise _Violation("invalid message format")
                elif not _COPY[msg_type]:
                    raise _Violation(f"invalid frontend message type {msg_type}")
                if new is not None:
                    if out is None:
                        out = []
                    out.append(data[seg:pos])
                    out.append(new)
                    seg = end
                pos = end
        # One name per clause (compiled: one typed variable each).
        except _Violation as violation:
            self._malformed(server, str(violation))
            return
        except _MALFORMED:
            self._malformed(server, "invalid message format")
            return
        if fresh and pos == n and replies == 1 and out is not None and out[1][:1] == b"B":
            # A Bind of a statement the link holds, Execute, Sync: kept, to be sent again
            # should the server say it has no such statement (prepared.retry_due).
            name = prepared.retryable(data, server)
            if name is not None:
                server.retry = (name, data)
        if pos:
            if replies:
                server.outstanding += replies
                self.request_time = self.last_activity
            if out is None:
                server.write(data if pos == n else data[:pos])
            else:
                out.append(data[seg:pos])
                payload = b"".join(out)
                if payload:
                    server.write(payload)
            stats.bytes_received += pos
        if pos < n:
            if hold > _STREAM_AFTER:
                # A long message that must be whole (a mapped Parse): gathered in chunks.
                rest = data[pos:]
                self._set_aside().long = _LongMessage([rest], hold - len(rest))
            else:
                self._pending = data[pos:]
        if answered:
            self.server_ready(server)

    def send_again(self, data: bytes) -> None:
        """The client's exchange once more, as it sent it (a statement was missing; prepared.retry_due)."""
        self._forward(data)

    def _end_long(self) -> None:
        aside = self._aside
        assert aside is not None
        aside.long = None

    def _long_message(self, long: _LongMessage, data: bytes) -> bytes:
        """The next chunk of a long message: b"" while more of it is to come, else the
        whole message and what follows it (gathered), or what follows it (passed through)."""
        rest = long.rest
        chunks = long.chunks
        if chunks is not None:
            chunks.append(data)
            if len(data) < rest:
                long.rest = rest - len(data)
                return b""  # each chunk is copied once, when the message is whole
            self._end_long()
            return b"".join(chunks)
        server = self.server
        assert server is not None and self.pool is not None
        if len(data) < rest:
            long.rest = rest - len(data)
            server.write(data)
            self.pool.stats.bytes_received += len(data)
            return b""
        self._end_long()
        server.write(data[:rest])
        self.pool.stats.bytes_received += rest
        return data[rest:]

    def _stream_head(
        self, data: bytes, pos: int, end: int, server: ServerConnection, replies: int
    ) -> tuple[bytes | None, int, int] | None:
        """Act on the head of a long message so that its body can go through unread.

        Returns (bytes to send in place of data[pos:seg], seg, replies); None when the
        message must be held whole (a mapped Parse); when the names it
        starts with have not all arrived: (None, -1, replies).
        """
        msg_type = data[pos]
        n = len(data)
        pool = self.pool
        assert pool is not None
        stats = pool.stats
        if _QUERY_OR_CALL[msg_type]:
            if server.replies:
                prepared.track(server, prepared.SYNC_REPLY, replies)
            return None, pos, replies + 1
        if msg_type == _P:
            name_end = data.find(b"\x00", pos + 5, n)
            if name_end < 0:
                if n - pos > _STREAM_AFTER:
                    raise _Violation("invalid message format")  # a statement name that long
                return None, -1, replies
            if self.maps_statements and name_end > pos + 5:
                return None
            self.unsynced = True
            prepared.track(server, prepared.PARSE_REPLY, replies)
            return None, pos, replies
        if msg_type == _B:
            portal_end = data.find(b"\x00", pos + 5, n)
            name_end = data.find(b"\x00", portal_end + 1, n) if portal_end >= 0 else -1
            if name_end < 0:
                if n - pos > _STREAM_AFTER:
                    raise _Violation("invalid message format")  # names that long
                return None, -1, replies
            self.unsynced = True
            if self.maps_statements and name_end > portal_end + 1:
                stats.bind_count += 1
                head = prepared.on_bind(
                    self, server, data[pos + 5 : name_end + 1], portal_end - pos - 5, replies, end - name_end - 1
                )
                if head is not None:
                    return head, name_end + 1, replies
            return None, pos, replies
        if _COPY[msg_type]:
            return None, pos, replies
        raise _Violation(f"invalid frontend message type {msg_type}")

    def _malformed(self, server: ServerConnection, message: str) -> None:
        # Replies of earlier messages of the chunk may be tracked but their bytes unsent:
        # the server is not reused (the pool closes it when it gets it back).
        server.close_needed = True
        self._protocol_violation(message)

    def _parse_effect(self, sql: bytes) -> None:
        """A Parse the proxy does not map, whose SQL may touch session state."""
        effect = sqlscan.scan(sql.decode(errors="replace"))
        if effect:
            self.apply_effect(effect)

    def apply_effect(self, effect: sqlscan.SqlEffect) -> None:
        """Pin the client to its server while session state lives there; unpin when gone."""
        if self.pool is None or self.pool.session_mode:
            return  # the server is the client's anyway, and reset at logout
        if effect.pins - self.pins:
            log.debug("%r keeps its server: %s", self, ", ".join(sorted(effect.pins - self.pins)))
        pins = (self.pins | effect.pins) - effect.unpins
        self.pins = pins if pins else _NO_PINS

    def server_ready(self, server: ServerConnection) -> None:
        """ReadyForQuery arrived for this client: decide whether the server goes back.

        Transaction mode releases at 'I' with no reply outstanding and no extended
        message unsynced (a pipelining client may still wait for more); statement mode
        also refuses transaction blocks; session mode keeps the server until logout.
        """
        pool = self.pool
        assert pool is not None
        pool.stats.query_count += 1
        if server.outstanding > 0 or self.unsynced or server.busy_internally or self._receiving_long():
            return  # (a long message still coming in keeps its server too)
        if server.tx_status != _IDLE:
            if pool.refuses_blocks:
                pool.refuse_transaction_block(self, server)
            return
        # (pins: the shared empty set, else a client's own, never empty; see apply_effect)
        if pool.session_mode or self.pins is not _NO_PINS:
            if server.close_needed and pool.fast_close:
                # server_fast_close: the session ends with its transaction, not at logout.
                self.terminate(sqlstate.ADMIN_SHUTDOWN, "server_fast_close: the server connection is closing")
            return
        self._release()

    def _release(self) -> None:
        server, self.server = self.server, None
        assert server is not None and self.pool is not None
        server.client = None
        self.state = ClientState.IDLE
        self.pool.release(server, False)
        if self.close_at_boundary:
            self.terminate(sqlstate.ADMIN_SHUTDOWN, "pgfleet is shutting down; reconnect")
        elif self._pending:
            self._need_server(self.pooler.clock())

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)
            if self.pool is not None:
                self.pool.stats.bytes_sent += len(data)

    def parameter_changed(self, name: str, value: str) -> None:
        """The server reported a new value of a tracked parameter (params.TRACKED)."""
        if self.params.get(name) != value:
            self.params = {**self.params, name: value}  # shared with others: replaced, not changed

    def server_lost(self, server: ServerConnection) -> None:
        """The linked server went away mid-transaction: say so and end this client.

        After the server's own FATAL (terminated, shut down) the client has heard why,
        as directly: a second error would be one too many (drivers report both).
        """
        self.server = None
        if server.ended_fatally:
            self.close()
        else:
            self.terminate(sqlstate.CONNECTION_FAILURE, "pgfleet: server connection lost; the transaction is gone")

    # -- flow control and closing --------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and self.state is not ClientState.CLOSED:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and self.state is not ClientState.CLOSED:
            self._reading_paused = False
            self.transport.resume_reading()

    def reading_held(self) -> bool:
        """Reading stays paused past a turn's end (turns.py): by back-pressure, which the
        server's resume_writing ends, or a full queue, which `link` ends."""
        server = self.server
        if server is not None and server.write_paused:
            return True
        return self.state is ClientState.WAITING and len(self._pending) > _QUEUED_BUFFER_LIMIT

    def _protocol_violation(self, message: str) -> None:
        log.warning("client %s:%s: %s", *self.address, message)
        self.terminate(sqlstate.PROTOCOL_VIOLATION, message)

    def fatal_fields(self, fields: dict[str, str]) -> None:
        """End the client with a server's (or the pool's) error fields, e.g. the database is down."""
        self.terminate(fields.get("C", sqlstate.CONNECTION_FAILURE), fields.get("M", "error"), fields.get("D"))

    def terminate(self, code: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL ErrorResponse and close the connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(backend.error_response(code, message, "FATAL", detail))
        self.close()

    def send_error(self, code: str, message: str) -> None:
        """A non-fatal ErrorResponse followed by ReadyForQuery: the client carries on."""
        self.send(backend.error_response(code, message) + backend.ready_for_query(IDLE))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def __repr__(self) -> str:
        return f"<client {self.user}@{self.database} {self.state.value} {self.address}>"
