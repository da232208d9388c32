"""Handling of server connections: login, then forwarding responses to a linked client.

A server link lives in one of the states below; the pool owns the lists that the
IDLE and ACTIVE states stand for. Responses are forwarded in the chunks they arrive
in; only message headers are scanned, and only ReadyForQuery, ParameterStatus and
ErrorResponse bodies are read.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, cast

from . import params, turns
from . import prepared as statements
from .auth import AuthFailed, ScramClientExchange, is_md5, is_plaintext, md5_response
from .passthrough import ScramKeys, ScramKeysExchange
from .protocol import backend, frontend
from .protocol.backend import IDLE
from .protocol.errors import CONNECTION_FAILURE, INVALID_AUTHORIZATION, ProtocolError
from .protocol.framing import MessageReader, frame, type_table
from .protocol.startup import build_startup_message

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool

log = logging.getLogger("pgfleet.server")

# Final: compiled (mypyc), names read for every message are C statics (see client.py).
_Z: Final = ord("Z")
_S: Final = ord("S")
_E: Final = ord("E")
_C: Final = ord("C")
_IDLE: Final = IDLE
# Server messages the forwarding scan must look at (ParseComplete and CloseComplete:
# some answer the proxy's own Parse/Close and go no further, see prepared.py).
_WATCHED: Final = type_table(bytes((_Z, _S, _E, statements.PARSE, statements.CLOSE)))
_CACHE_WIPED = frozenset((b"DISCARD ALL\x00", b"DEALLOCATE ALL\x00"))


class ServerState(enum.Enum):
    LOGIN = "login"  # connecting and authenticating; counted in pool.connecting
    IDLE = "idle"  # in pool.idle, ready for a client
    ACTIVE = "active"  # linked to a client (or running the pool's own query)
    CLOSED = "closed"


class ServerLoginError(Exception):
    """Login to the server failed; `fields` are the server's ErrorResponse, if any."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {"S": "FATAL", "C": CONNECTION_FAILURE, "M": message}


def _refused(message: str) -> ServerLoginError:
    """A login that pgfleet's own settings make impossible: retrying cannot help (28000)."""
    return ServerLoginError(message, {"S": "FATAL", "C": INVALID_AUTHORIZATION, "M": message})


class ServerConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = ServerState.LOGIN
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.params: dict[str, str] = {}
        # The subset of params that follows clients: equal to a client's params means
        # nothing to SET when that client's transaction lands here (one dict compare).
        self.tracked_params: dict[str, str] = {}
        # The client params found equal to tracked_params at the last link (None: not
        # known). Clients' params are replaced, never changed in place, and clients of a
        # pool share one: an identity test spares the dict compare on most links. Reset
        # wherever tracked_params changes.
        self.synced_params: Mapping[str, str] | None = None
        self.backend_pid = 0
        self.backend_key = 0
        self.tx_status = IDLE
        self.xact_start = 0.0  # when the transaction open on this link began (tx_status not IDLE)
        # Replies (ReadyForQuery) the linked client still waits for.
        self.outstanding = 0
        # CancelRequests sent to this backend whose connections PostgreSQL has not yet
        # closed. Until it has, a cancel meant for the previous client could still stop
        # the next one's query, so the pool holds the server back (pool._give, as PgBouncer).
        self.cancels_in_flight = 0
        self.after_cancels: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        self.created_at = loop.time()
        self.last_used = self.created_at
        self.link_time = 0.0
        self.address = ("", 0)
        self.local_address = ("", 0)
        self.tls = ""  # "TLSv1.3/<cipher>" on a TLS link (SHOW SERVERS)
        # Set when the server must not go back to the pool (lifetime, lower limit, error).
        self.close_needed = False
        # Server-side statements this link holds, least recently used first.
        self.prepared: collections.OrderedDict[str, None] = collections.OrderedDict()
        # What each '1', '3' and 'Z' the client's messages will get stands for (prepared.py).
        self.replies: collections.deque[statements.Reply] = collections.deque()
        # Statements to close here before the next Parse (stale plans, skipped Closes).
        self.to_close: list[str] = []
        # An error in the extended protocol with no Sync sent yet: the server discards
        # what the client sends up to its Sync, without a reply (prepared.track).
        self.skipping_to_sync = False
        # The server sent the client a FATAL error: the connection ends with that.
        self.ended_fatally = False
        # Startup settings a client's link set here (client.startup_sets), reset at release.
        self.startup_sets: tuple[str, ...] = ()
        # The error fields of the last failed internal query, for a caller that asks.
        self.internal_error: dict[str, str] | None = None
        # The client's exchange now in flight, kept to send again should its Bind find
        # the statement missing (server name, bytes: prepared.retryable), and the error
        # held back meanwhile (sent after all if the retry cannot be).
        self.retry: tuple[str, bytes] | None = None
        self.retry_error: bytes | None = None
        # Internal queries whose replies are swallowed, one callback per ReadyForQuery (a
        # few at most: a list, whose emptiness compiled code reads inline, unlike a deque's).
        self._swallow: list[Callable[[], None] | None] = []
        self._partial = b""
        self._skip = 0
        self._reading_paused = False
        self._yielding = False  # reading paused until the loop's next turn (turns.py)
        # The transport's buffer is over its high-water mark: its client is not read.
        self.write_paused = False
        self._login_reader: MessageReader | None = MessageReader()
        self._login_queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self._login_waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._call_soon = loop.call_soon

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.address = tuple(peer[:2]) if isinstance(peer, tuple) else (str(peer or "unix"), 0)
        self.local_address = tuple(sock[:2]) if isinstance(sock, tuple) else (str(sock or "unix"), 0)

    def data_received(self, data: bytes) -> None:
        if self._login_reader is not None:
            self._login_reader.feed(data)
            try:
                self._login_queue.extend(self._login_reader.messages())
            except ProtocolError as exc:
                self._fail_login(exc)
                return
            self._wake()
            return
        if len(data) >= turns.YIELD_AFTER:  # a long result is read one buffer per turn
            turns.yield_turn(self, self._call_soon)
        self._forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("server closed the connection")
        previous = self.state
        self.state = ServerState.CLOSED
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)
        if previous is not ServerState.CLOSED:
            self.pool.server_closed(self, previous)
            client = self.client
            if client is not None:
                self.client = None
                client.server_lost(self)

    def pause_writing(self) -> None:
        # The server does not read fast enough: stop reading from the client feeding it.
        self.write_paused = True
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.resume_reading()

    # -- login ----------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_login(self, exc: Exception) -> None:
        self._lost = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    async def _next_login_message(self) -> tuple[int, bytes]:
        while not self._login_queue:
            if self._lost is not None:
                raise ServerLoginError(f"server closed the connection during login: {self._lost}")
            self._login_waiter = asyncio.get_running_loop().create_future()
            await self._login_waiter
        return self._login_queue.popleft()

    async def login(self, user: str, dbname: str, secret: str | ScramKeys | None) -> None:
        """Authenticate as `user` and read the server's parameters up to ReadyForQuery."""
        assert self.transport is not None
        self.transport.write(build_startup_message({"user": user, "database": dbname}))
        scram: ScramClientExchange | ScramKeysExchange | None = None
        while True:
            msg_type, body = await self._next_login_message()
            if msg_type == ord("R"):
                request = backend.parse_authentication(body)
                scram = self._answer_auth(request, user, secret, scram)
            elif msg_type == _S:
                name, value = backend.parse_parameter_status(body)
                self.params[name] = value
            elif msg_type == ord("K"):
                self.backend_pid, self.backend_key = backend.parse_backend_key_data(body)
            elif msg_type == _E:
                fields = backend.parse_error_fields(body)
                raise ServerLoginError(fields.get("M", "login failed"), fields)
            elif msg_type == _Z:
                break
        self._login_reader = None
        self._login_queue.clear()
        self.tracked_params = {name: value for name, value in self.params.items() if name in params.TRACKED}
        self.synced_params = None

    async def exchange(self, data: bytes) -> list[tuple[int, bytes]]:
        """Send `data` on a link outside the pools and read the answer up to ReadyForQuery
        (the auth_query lookup, credentials.py)."""
        assert self.transport is not None
        self._login_reader = MessageReader()
        self.transport.write(data)
        messages: list[tuple[int, bytes]] = []
        while not messages or messages[-1][0] != _Z:
            messages.append(await self._next_login_message())
        self._login_reader = None
        return messages

    def _answer_auth(
        self,
        request: backend.AuthRequest,
        user: str,
        secret: str | ScramKeys | None,
        scram: ScramClientExchange | ScramKeysExchange | None,
    ) -> ScramClientExchange | ScramKeysExchange | None:
        assert self.transport is not None
        code = request.code
        if code == backend.AUTH_OK:
            return scram
        if secret is None:
            raise _refused(f'server asks for a password for user "{user}" and none is configured')
        if code in (backend.AUTH_CLEARTEXT, backend.AUTH_MD5) and isinstance(secret, ScramKeys):
            raise _refused(f'server asks for a password; pgfleet has only SCRAM keys for "{user}" (pass-through)')
        if code == backend.AUTH_CLEARTEXT:
            assert not isinstance(secret, ScramKeys)
            if not is_plaintext(secret):
                raise _refused(f'server asks for a cleartext password; auth_file has no plaintext for "{user}"')
            self.transport.write(frontend.password_message(secret))
        elif code == backend.AUTH_MD5:
            assert not isinstance(secret, ScramKeys)
            if not (is_plaintext(secret) or is_md5(secret)):
                raise _refused(f'server asks for md5; auth_file has a SCRAM secret for "{user}"')
            self.transport.write(frontend.password_message(md5_response(user, secret, request.data[:4])))
        elif code == backend.AUTH_SASL:
            if "SCRAM-SHA-256" not in backend.parse_sasl_mechanisms(request.data):
                raise _refused("server offers no SASL mechanism pgfleet supports")
            if isinstance(secret, ScramKeys):
                scram = ScramKeysExchange(secret)  # pass-through: the keys of the client's own exchange
            elif not is_plaintext(secret):
                raise _refused(
                    f'server asks for SCRAM; auth_file needs a plaintext password for "{user}", '
                    "or a client of that user logging in with SCRAM first (pass-through)"
                )
            else:
                scram = ScramClientExchange(user, secret)
            self.transport.write(frontend.sasl_initial_response("SCRAM-SHA-256", scram.first()))
        elif code == backend.AUTH_SASL_CONTINUE and scram is not None:
            try:
                self.transport.write(frontend.sasl_response(scram.final(request.data)))
            except AuthFailed as exc:
                raise _refused(str(exc)) from exc
        elif code == backend.AUTH_SASL_FINAL and scram is not None:
            try:
                scram.verify(request.data)
            except AuthFailed as exc:
                raise _refused(str(exc)) from exc
        else:
            raise _refused(f"server asks for an unsupported authentication method ({code})")
        return scram

    # -- forwarding -------------------------------------------------------------------------
    def _forward(self, data: bytes) -> None:
        """Scan headers, forward to the linked client, act on ReadyForQuery."""
        skip = self._skip
        if skip:
            if len(data) <= skip:
                self._skip = skip - len(data)
                self._emit(data)
                return
            pos = skip
            self._skip = 0
        else:
            pos = 0
            if self._partial:
                data = self._partial + data
                self._partial = b""
        n = len(data)
        seg = 0  # start of the run of bytes not yet forwarded
        saw_ready = False
        while n - pos >= 5:
            msg_type = data[pos]
            # The length read byte by byte: compiled, four native reads, no call or tuple.
            end = pos + 1 + ((data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4])
            if self._swallow:
                # Replies to the proxy's own queries never reach the client.
                if end > n:
                    break
                self._emit(data[seg:pos])
                seg = end
                self._swallowed(msg_type, data, pos, end)
            elif _WATCHED[msg_type]:
                if end > n:
                    break
                if msg_type == _Z:
                    status = data[pos + 5]
                    if status != _IDLE and self.tx_status == _IDLE and self.client is not None:
                        # A transaction began with the request just answered (transaction_timeout).
                        self.xact_start = self.client.request_time
                    self.tx_status = status
                    self.outstanding -= 1
                    if status == _IDLE and self.outstanding <= 0:
                        self.pool.stats.xact_count += 1  # a transaction ended (PgBouncer's xact_count)
                    saw_ready = True
                    if self.replies:
                        statements.on_ready(self)
                    settled = -1
                    if self.retry is not None or self.retry_error is not None:
                        settled = self._settle_retry(status, data, seg, pos, end)
                    if settled >= 0:
                        seg = settled
                    elif status != _IDLE and self.pool.refuses_blocks:
                        # Statement mode: the client hears of the refusal in place of this
                        # ReadyForQuery, once the block is rolled back (pool.refuse_...).
                        self._emit(data[seg:pos])
                        seg = end
                elif msg_type == _S:
                    self._parameter_status(data[pos + 5 : end])
                elif msg_type == _E:
                    self.pool.stats.errors += 1
                    severity = backend.parse_error_fields(data[pos + 5 : end]).get("V")
                    if severity in ("FATAL", "PANIC"):
                        # The server closes after it: its word is the client's last (server_lost).
                        self.ended_fatally = True
                    rewritten = statements.on_error(self, data[pos + 5 : end])
                    if self.retry is not None and statements.retry_due(self, data[pos + 5 : end]):
                        # Held back: the exchange is sent again once this one is over.
                        self._emit(data[seg:pos])
                        seg = end
                        self.retry_error = frame(b"E", rewritten) if rewritten is not None else data[pos:end]
                    elif rewritten is not None:
                        self._emit(data[seg:pos])
                        seg = end
                        self._emit(frame(b"E", rewritten))
                elif self.replies:
                    if self.replies.popleft().skip:
                        self._emit(data[seg:pos])
                        seg = end
                else:
                    statements.on_unexpected(self, msg_type)
            pos = end
        # The chunk as it came when all of it goes on (compiled, a slice is always a copy).
        if pos > n:
            # A long message (rows, COPY data) continues in the next chunk.
            self._skip = pos - n
            self._emit(data[seg:] if seg else data)
        else:
            self._emit(data[seg:pos] if seg or pos < n else data)
            if pos < n:
                self._partial = data[pos:]
        if saw_ready and self.client is not None:
            self.client.server_ready(self)

    def _settle_retry(self, status: int, data: bytes, seg: int, pos: int, end: int) -> int:
        """ReadyForQuery of an exchange kept for a retry: send it again if its Bind failed
        for a missing statement (the link has forgotten its statements: a Parse goes
        first). Returns where the bytes not yet forwarded start, -1 if it went through."""
        retry, failed = self.retry, self.retry_error
        self.retry = self.retry_error = None
        if failed is None:
            return -1
        self._emit(data[seg:pos])
        client = self.client
        if retry is not None and client is not None and status == _IDLE and self.outstanding == 0:
            log.info("server %s: statement %s was missing; prepared and sent again", self.backend_pid, retry[0])
            client.send_again(retry[1])
            return end  # this ReadyForQuery is not the client's
        self._emit(failed)  # the client sent more meanwhile: it hears the error after all
        return pos

    def _emit(self, chunk: bytes) -> None:
        if chunk and self.client is not None:
            self.client.send(chunk)

    def _swallowed(self, msg_type: int, data: bytes, pos: int, end: int) -> None:
        if msg_type == _Z:
            self.tx_status = data[pos + 5]
            then = self._swallow.pop(0)
            if then is not None:
                then()
        elif msg_type == _S:
            self._parameter_status(data[pos + 5 : end], swallowed=True)
        elif msg_type == _C and data[pos + 5 : end] in _CACHE_WIPED:
            # A reset query (server_reset_query) took the link's prepared statements.
            self.prepared.clear()
            self.to_close.clear()
        elif msg_type == _E:
            fields = backend.parse_error_fields(data[pos + 5 : end])
            log.warning("internal query on server %s failed: %s", self.backend_pid, fields.get("M"))
            self.close_needed = True
            self.internal_error = fields

    def _parameter_status(self, body: bytes, swallowed: bool = False) -> None:
        """A ParameterStatus, forwarded by the caller or (`swallowed`) a reply to the proxy's own query.

        Of the swallowed ones, the client hears those that differ from what it was told:
        the server's spelling of the value a SET asked for (`utc` is reported `UTC`).
        """
        name, value = backend.parse_parameter_status(body)
        self.params[name] = value
        if name in params.TRACKED:
            self.tracked_params[name] = value
            self.synced_params = None
            client = self.client
            if client is not None:
                if swallowed and client.params.get(name) != value:
                    client.send(frame(b"S", body))
                client.parameter_changed(name, value)

    # -- the proxy's own queries ------------------------------------------------------------
    def run_internal(self, sql: str, then: Callable[[], None] | None = None) -> None:
        """Send a simple query whose replies are swallowed; call `then` at its ReadyForQuery.

        Only sent where replies cannot interleave with a client's: before the client's
        first message, or when nothing of the client's is outstanding.
        """
        assert self.transport is not None
        self._swallow.append(then)
        self.transport.write(frontend.query(sql))

    def close_extended_exchange(self) -> None:
        """A client left an extended-protocol exchange open: a Sync ends it, reply swallowed."""
        assert self.transport is not None
        self.skipping_to_sync = False
        self._swallow.append(None)
        self.transport.write(frontend.SYNC)

    def when_idle(self, then: Callable[[], None]) -> None:
        """Call `then` once the proxy's own queries in flight are answered (now if none)."""
        if not self._swallow:
            then()
            return
        previous = self._swallow[-1]

        def both() -> None:
            if previous is not None:
                previous()
            then()

        self._swallow[-1] = both

    def cancel_done(self) -> None:
        """A CancelRequest to this backend has been answered (or given up on)."""
        self.cancels_in_flight -= 1
        if not self.cancels_in_flight and self.after_cancels is not None:
            then, self.after_cancels = self.after_cancels, None
            then()

    @property
    def busy_internally(self) -> bool:
        return bool(self._swallow)

    # -- flow control and closing -------------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and self.state is not ServerState.CLOSED:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and self.state is not ServerState.CLOSED:
            self._reading_paused = False
            self.transport.resume_reading()

    def reading_held(self) -> bool:
        """Reading stays paused past a turn's end (turns.py): by back-pressure, which the
        client's resume_writing ends."""
        client = self.client
        return client is not None and client.write_paused

    def close(self, reason: str = "") -> None:
        """Terminate politely; the pool hears about it through connection_lost."""
        if self.transport is None:
            return
        if reason:
            log.debug("closing server %s: %s", self.backend_pid, reason)
        if not self.transport.is_closing():
            try:
                self.transport.write(frontend.TERMINATE)
            finally:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    @property
    def is_clean_but_marked(self) -> bool:
        """Idle, outside a transaction, nothing outstanding, whatever close_needed says."""
        return self.tx_status == IDLE and self.outstanding == 0 and not self._swallow

    @property
    def is_clean(self) -> bool:
        """Idle, outside a transaction, nothing outstanding: safe to hand to anyone."""
        return self.tx_status == IDLE and self.outstanding == 0 and not self._swallow and not self.close_needed

    def __repr__(self) -> str:
        return f"<server pid={self.backend_pid} {self.state.value} {self.pool.name}>"
