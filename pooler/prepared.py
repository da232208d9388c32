"""Named prepared statements in transaction mode ("sync the shorthand").

Each client's statement names map to server-side names shared by identical statements
(same query text and parameter types): `pgf_` + a hash. A server link prepares a
statement the first time a transaction there needs it, and keeps at most
`max_prepared_statements` (least recently used closed first).

The bookkeeping of the response stream is one queue per server link, `server.replies`:
one `Reply` per message sent that the server answers with ParseComplete ('1'),
CloseComplete ('3') or ReadyForQuery ('Z'), in sending order. Bind, Describe and Execute
replies need no entry: the proxy never adds or removes one of those. A reply marked
`skip` answers a message the proxy injected (a Parse before a Bind, a Close of an
evicted statement) and never reaches the client. Instead of making up a ParseComplete
for a client Parse the server has already seen, the proxy sends a Parse+Close of an
empty statement under a name of its own: the server itself then answers in the right
place of the stream, and skips it after an error exactly as it skips the rest.

An ErrorResponse in the extended protocol makes the server discard messages up to Sync:
every P/C entry before the next Z entry gets no reply; their `undo` forgets what their
message would have done (a statement registered on the link, a client name mapped).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import sqlscan
from .protocol import backend, extended
from .protocol import errors as sqlstate
from .protocol.errors import ProtocolError
from .protocol.framing import frame

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

log = logging.getLogger("pgfleet.prepared")

PREFIX = "pgf_"
# A name only the proxy uses, for the no-op Parse+Close that stands in for a Parse the
# server does not need; closed right after, so it never exists between messages.
VOID = PREFIX + "void"
_VOID_PARSE = extended.parse(VOID, "")
_VOID_CLOSE = extended.close(extended.STATEMENT, VOID)

SYNC_TYPE: Final = ord("S")
# What a client that never named a statement holds, shared by all of them: a name is only
# ever added by on_parse, which gives the client its own dict first. Everything else
# removes or renames names it found, which an empty dict has none of.
NO_STATEMENTS: Final[dict[str, Statement]] = {}
DESCRIBE_TYPE: Final = ord("D")
PORTAL_KIND: Final = ord("P")
PARSE: Final = ord("1")
CLOSE: Final = ord("3")
SYNC: Final = ord("Z")

_STALE_PLAN = "cached plan must not change result type"
# A parameter type of the statement is gone (dropped, or created by a rolled-back
# transaction): PostgreSQL fixed the types at Parse and never looks again.
_STALE_TYPE = "cache lookup failed for type "
_SERVER_NAME = re.compile(r'"(' + PREFIX + r'[0-9a-f]+(?:_\d+)?)"')


@dataclass(slots=True, eq=False)
class Reply:
    """What one reply ('1', '3' or 'Z') of the server stands for."""

    kind: int
    skip: bool = False
    undo: Callable[[], None] | None = None  # the message got no reply (error) or failed
    # Z only: server names bound in the batch this Sync ends (for stale-plan recovery),
    # and a callback told whether the batch/query went without error.
    binds: list[str] | None = None
    done: Callable[[bool], None] | None = None
    failed: bool = False


# Final: compiled (mypyc), C statics rather than module attributes for their users.
PARSE_REPLY: Final = Reply(PARSE)
CLOSE_REPLY: Final = Reply(CLOSE)
SYNC_REPLY: Final = Reply(SYNC)


@dataclass(slots=True, eq=False)
class Statement:
    name: str  # server-side name
    key: bytes  # query text and parameter types, as the client's Parse carried them
    parse: bytes  # the Parse message that prepares it on a server
    effect: sqlscan.SqlEffect | None  # session effect, applied at each Bind


class StatementRegistry:
    """One per pool: the current server-side name of each distinct statement."""

    MAX_CACHED = 10_000

    def __init__(self) -> None:
        self._current: dict[bytes, Statement] = {}
        # Bumped when a statement's plan went stale, so that every server prepares anew.
        self._generation: dict[bytes, int] = {}

    def get(self, key: bytes) -> Statement:
        stmt = self._current.get(key)
        if stmt is None:
            if len(self._current) >= self.MAX_CACHED:
                self._current.clear()
            stmt = self._make(key, self._generation.get(key, 0))
            self._current[key] = stmt
        return stmt

    def renew(self, stale: Statement) -> Statement:
        """The statement under a new name (its plan on some server no longer fits)."""
        current = self._current.get(stale.key)
        if current is not None and current.name != stale.name:
            return current
        generation = self._generation.get(stale.key, 0) + 1
        self._generation[stale.key] = generation
        stmt = self._current[stale.key] = self._make(stale.key, generation)
        return stmt

    @staticmethod
    def _make(key: bytes, generation: int) -> Statement:
        name = PREFIX + hashlib.blake2b(key, digest_size=8).hexdigest()
        if generation:
            name += f"_{generation}"
        query_end = key.find(b"\x00")
        effect = None
        if query_end > 0 and sqlscan.worth_a_look(key, 0, query_end):
            effect = sqlscan.scan(key[:query_end].decode(errors="replace")) or None
        return Statement(name, key, extended.parse_renamed(name, key), effect)


# -- the client's messages -----------------------------------------------------------------------


def track(server: ServerConnection, reply: Reply, untracked: int) -> None:
    """Queue `reply`; an empty queue first gets one Z entry per ReadyForQuery still owed.

    `untracked` counts the Z-producing messages of the chunk being forwarded that went
    without an entry (they are not in `server.outstanding` yet).
    """
    if server.skipping_to_sync and reply.kind != SYNC:
        # The server discards this message (an error came before, its Sync did not yet).
        if reply.undo is not None:
            reply.undo()
        return
    replies = server.replies
    if not replies:
        for _ in range(server.outstanding + untracked):
            replies.append(SYNC_REPLY)
    replies.append(reply)


def _room(client: ClientConnection, server: ServerConnection, untracked: int) -> bytes:
    """Closes owed to the server (stale or evicted statements), to run before a Parse."""
    out = []
    for name in server.to_close:
        track(server, Reply(CLOSE, skip=True, undo=_reclose(server, name)), untracked)
        out.append(extended.close(extended.STATEMENT, name))
    server.to_close.clear()
    limit = server.pool.pooler.config.max_prepared_statements
    prepared = server.prepared
    in_use = client.batch_binds or ()
    tries = len(prepared)
    while len(prepared) >= limit and tries > 0:
        tries -= 1
        name = next(iter(prepared))
        if name in in_use:
            # A portal of this batch may come from it: closing it would close the portal.
            prepared.move_to_end(name)
            continue
        del prepared[name]
        track(server, Reply(CLOSE, skip=True, undo=_reclose(server, name)), untracked)
        out.append(extended.close(extended.STATEMENT, name))
    return b"".join(out)


def _reclose(server: ServerConnection, name: str) -> Callable[[], None]:
    def undo() -> None:
        # The Close was skipped: the statement still exists there and must go later.
        server.to_close.append(name)

    return undo


def _unregister(server: ServerConnection, name: str, forget: Callable[[], None] | None) -> Callable[[], None]:
    def undo() -> None:
        server.prepared.pop(name, None)
        if forget is not None:
            forget()

    return undo


def ensure(
    client: ClientConnection,
    server: ServerConnection,
    stmt: Statement,
    untracked: int,
    forget: Callable[[], None] | None = None,
) -> bytes:
    """Bytes to send so that `stmt` exists on `server` (nothing when it already does).

    The Parse is the proxy's own, its ParseComplete skipped, unless `forget` is given:
    then it answers a client's Parse, and `forget` drops the client's name if it fails.
    """
    stats = server.pool.stats
    prepared = server.prepared
    if stmt.name in prepared:
        prepared.move_to_end(stmt.name)
        stats.prepared_hits += 1
        return b""
    stats.prepared_misses += 1
    stats.server_parse_count += 1
    pre = _room(client, server, untracked)
    prepared[stmt.name] = None
    track(server, Reply(PARSE, skip=forget is None, undo=_unregister(server, stmt.name, forget)), untracked)
    return pre + stmt.parse


def on_parse(client: ClientConnection, server: ServerConnection, body: bytes, untracked: int) -> bytes | None:
    """A client's Parse of a named statement: the bytes to send in its place."""
    name, key = extended.split_parse(body)
    statements = client.statements
    old = statements.get(name)
    if old is not None:
        # PostgreSQL says 42P05; so does the server, asked to re-create the client's
        # statement under its server name (the error's name is put back on the way out).
        pre = ensure(client, server, old, untracked)
        server.pool.stats.server_parse_count += 1
        track(server, PARSE_REPLY, untracked)
        return pre + extended.parse_renamed(old.name, key)
    stmt = server.pool.statements.get(key)
    if statements is NO_STATEMENTS:
        statements = client.statements = {}  # its own from its first named statement on
    statements[name] = stmt

    def forget() -> None:
        if statements.get(name) is stmt:
            del statements[name]

    sent = ensure(client, server, stmt, untracked, forget)
    if sent:
        return sent
    # The server has it already: a Parse+Close of a void statement answers in place.
    track(server, Reply(PARSE, undo=forget), untracked)
    track(server, Reply(CLOSE, skip=True), untracked)
    return _VOID_PARSE + _VOID_CLOSE


def on_bind(
    client: ClientConnection, server: ServerConnection, body: bytes, portal_end: int, untracked: int, more: int = 0
) -> bytes | None:
    """A client's Bind of a named statement: maybe a Parse first, then the Bind renamed.

    `more`: bytes of the Bind that follow `body` (a long one passes through unread), so
    the renamed head announces the length of the whole message.
    """
    name_end = body.find(b"\x00", portal_end + 1)
    if name_end < 0:
        raise ProtocolError("unterminated string in message")
    name = body[portal_end + 1 : name_end].decode(errors="replace")
    stmt = client.statements.get(name)
    if stmt is None:
        return None  # the server answers 26000, as PostgreSQL would
    pre = ensure(client, server, stmt, untracked)
    if client.batch_binds is None:
        client.batch_binds = [stmt.name]  # created on the first Bind: most clients never bind
    else:
        client.batch_binds.append(stmt.name)
    if stmt.effect is not None:
        client.apply_effect(stmt.effect)
    head = body[: portal_end + 1] + stmt.name.encode() + body[name_end:]
    if more:
        return pre + b"B" + (4 + len(head) + more).to_bytes(4, "big") + head
    return pre + frame(b"B", head)


def on_describe(client: ClientConnection, server: ServerConnection, body: bytes, untracked: int) -> bytes | None:
    name = body[1:-1].decode(errors="replace")
    stmt = client.statements.get(name)
    if stmt is None:
        return None
    pre = ensure(client, server, stmt, untracked)
    return pre + extended.describe(extended.STATEMENT, stmt.name)


def on_close(client: ClientConnection, server: ServerConnection, body: bytes, untracked: int) -> bytes:
    """Close of a client statement: forget the name; the server's copy stays for others."""
    name = body[1:-1].decode(errors="replace")
    statements = client.statements
    stmt = statements.pop(name, None)

    def undo() -> None:
        if stmt is not None and name not in statements:
            statements[name] = stmt

    track(server, Reply(CLOSE, undo=undo if stmt is not None else None), untracked)
    return _VOID_CLOSE


# -- SQL that touches statements ------------------------------------------------------------------

LOCAL_ANSWER = b""  # on_query's answer when the proxy replied itself; nothing goes to the server


def on_query(
    client: ClientConnection, server: ServerConnection, body: bytes, untracked: int, alone: bool
) -> bytes | None:
    """A simple Query that `sqlscan` flagged: the bytes to send instead, LOCAL_ANSWER, or None.

    Tracks the query's ReadyForQuery like any other: a Z entry with a callback when the
    answer changes the link's statements, a plain one when replies are queued before it.
    """
    effect = sqlscan.scan(body[:-1].decode(errors="replace"))
    sent: bytes | None = None
    done: Callable[[bool], None] | None = None
    if effect.refuse:
        sent = _refusal(effect.refuse)
    elif effect:
        client.apply_effect(effect)
        maps = client.maps_statements
        if maps and effect.deallocate is not None:
            sent = _deallocate(client, server, effect.deallocate[0], alone)
            if sent is LOCAL_ANSWER:
                return sent  # only with an empty queue and nothing owed: no entry
            if sent is not None:
                done = _cleared(server)
        elif maps and (effect.discard_all or effect.deallocates):
            done = _discarded(server, client.statements if effect.discard_all else None)
    if done is not None:
        track(server, Reply(SYNC, done=done), untracked)
    elif server.replies:
        track(server, SYNC_REPLY, untracked)
    return sent


_DEALLOCATE_ALL = frame(b"Q", b"DEALLOCATE ALL\x00")


def _deallocate(client: ClientConnection, server: ServerConnection, name: str | None, alone: bool) -> bytes | None:
    """DEALLOCATE of a client name (None: ALL) as the whole query: LOCAL_ANSWER, the query to send, or None."""
    statements = client.statements
    if name is not None and name not in statements:
        return None  # the server answers 26000, as PostgreSQL would
    idle = not server.replies and server.outstanding == 0 and not client.unsynced and not server.busy_internally
    if name is None:
        _renew_all(server, statements)
        statements.clear()
    else:
        del statements[name]
    if alone and idle:
        if server.tx_status == backend.FAILED_TRANSACTION:
            client.send(
                backend.error_response(
                    sqlstate.IN_FAILED_SQL_TRANSACTION,
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
                + backend.ready_for_query(server.tx_status)
            )
        else:
            tag = "DEALLOCATE" if name is not None else "DEALLOCATE ALL"
            client.send(backend.command_complete(tag) + backend.ready_for_query(server.tx_status))
        return LOCAL_ANSWER
    # Pipelined behind other work: the server's answer must keep its place, and the
    # server has no statement of that name; DEALLOCATE ALL has the same effect for
    # the client (its names are gone) at the price of this link's shared statements.
    return _DEALLOCATE_ALL


def _renew_all(server: ServerConnection, statements: dict[str, Statement]) -> None:
    """DEALLOCATE ALL, DISCARD ALL: the next Parse of these texts gets a fresh server statement.

    As directly, where a Parse after them always makes a new statement. Drivers send
    them when their statements may have gone stale (psycopg after every rollback: a
    type its transaction created is gone, and a statement whose parameter has that
    type fails with "cache lookup failed" however often it is planned anew).
    A single DEALLOCATE or Close keeps the shared statement (drivers evict by LRU);
    the errors that mean stale renew it (see `on_error`).
    """
    registry = server.pool.statements
    for stmt in statements.values():
        registry.renew(stmt)


def _cleared(server: ServerConnection) -> Callable[[bool], None]:
    def done(ok: bool) -> None:
        if ok:
            server.prepared.clear()
            server.to_close.clear()

    return done


def _discarded(server: ServerConnection, statements: dict[str, Statement] | None) -> Callable[[bool], None]:
    """After DISCARD ALL (`statements` given) or a longer query with DEALLOCATE/DISCARD in it."""

    def done(ok: bool) -> None:
        if ok:
            server.prepared.clear()
            server.to_close.clear()
            if statements is not None:
                _renew_all(server, statements)
                statements.clear()
        elif statements is None:
            # Some of the query may have run before its error: what the link still holds
            # is unknown, so it is not reused.
            server.close_needed = True

    return done


def _refusal(message: str) -> bytes:
    # The server raises the error itself, so that a transaction block is aborted and
    # ReadyForQuery reports it exactly as for any other failing statement.
    escaped = message.replace("'", "''")
    code = sqlstate.FEATURE_NOT_SUPPORTED
    sql = f"DO $pgfleet$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{escaped}'; END$pgfleet$"
    return frame(b"Q", sql.encode() + b"\x00")


# -- the server's replies ------------------------------------------------------------------------------


def on_ready(server: ServerConnection) -> None:
    """ReadyForQuery: the Z entry at the front of the queue is answered."""
    reply = server.replies.popleft()
    if reply.kind != SYNC:
        _lost_track(server, f"ReadyForQuery where {chr(reply.kind)!r} was due")
        return
    if reply.done is not None:
        reply.done(not reply.failed)


def on_error(server: ServerConnection, body: bytes) -> bytes | None:
    """ErrorResponse: settle the replies it cancels; the body to forward if it must change."""
    replies = server.replies
    client = server.client
    binds: list[str] | None = None
    if replies:
        if replies[0].kind != SYNC:
            # Extended protocol: the server now skips to Sync; nothing before it is answered.
            while replies and replies[0].kind != SYNC:
                reply = replies.popleft()
                if reply.undo is not None:
                    reply.undo()
        if replies:
            front = replies[0]
            if front.done is not None:
                front.failed = True
            binds = front.binds
    if server.outstanding == 0:
        # No Sync (nor Query) in flight, so this is an extended-protocol error and the
        # server skips what comes next up to the client's Sync.
        server.skipping_to_sync = True
    if binds is None and client is not None:
        binds = client.batch_binds
    if client is None:
        return None
    fields = backend.parse_error_fields(body)
    if binds and _is_stale(fields):
        _renew_stale(client, server, binds)
    elif fields.get("C") == sqlstate.INVALID_SQL_STATEMENT_NAME:
        _forget_missing(server, fields.get("M", ""))
    if '"' + PREFIX in fields.get("M", "") + fields.get("D", ""):
        names = {stmt.name: name for name, stmt in client.statements.items()}
        return extended.rewrite_error(
            body, lambda text: _SERVER_NAME.sub(lambda m: '"' + names.get(m.group(1), m.group(1)) + '"', text)
        )
    return None


_RETRYABLE_TAIL: Final = frozenset(map(ord, "DE"))


def retryable(data: bytes, server: ServerConnection) -> str | None:
    """The server name bound when `data` is exactly Bind, [Describe portal], Execute, Sync.

    Such an exchange, started with nothing else in flight outside a transaction block,
    can be sent again if the Bind fails for a missing statement: the error is the first
    reply, nothing has reached the client, and the failed implicit transaction ran nothing.
    """
    replies = server.replies
    if len(replies) != 1 or replies[0].binds is None or len(replies[0].binds) != 1:
        return None
    pos = 1 + int.from_bytes(data[1:5], "big")  # past the Bind
    n = len(data)
    while pos < n:
        msg_type = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if msg_type == SYNC_TYPE:
            return replies[0].binds[0] if end == n else None
        if msg_type not in _RETRYABLE_TAIL or (msg_type == DESCRIBE_TYPE and data[pos + 5] != PORTAL_KIND):
            return None
        pos = end
    return None


def retry_due(server: ServerConnection, body: bytes) -> bool:
    """The error is 26000 for the statement of the exchange kept in `server.retry`."""
    retry = server.retry
    if retry is None:
        return False
    fields = backend.parse_error_fields(body)
    if fields.get("C") != sqlstate.INVALID_SQL_STATEMENT_NAME:
        return False
    found = _SERVER_NAME.search(fields.get("M", ""))
    return found is not None and found.group(1) == retry[0]


def _forget_missing(server: ServerConnection, message: str) -> None:
    """26000 for a statement this link was believed to hold: something on the server
    deallocated it where the scanner cannot see (`EXECUTE 'DEALLOCATE ALL'` in a DO
    block, a function). This request fails; the link forgets all it believed it held,
    so the next use of any of them prepares it again."""
    found = _SERVER_NAME.search(message)
    if found is not None and found.group(1) in server.prepared:
        log.info(
            "server %s: statement %s was deallocated behind the proxy; preparing anew",
            server.backend_pid,
            found.group(1),
        )
        server.prepared.clear()
        server.to_close.clear()


def _is_stale(fields: dict[str, str]) -> bool:
    """An error that means the server's statement no longer fits the database."""
    code, message = fields.get("C"), fields.get("M", "")
    if code == sqlstate.FEATURE_NOT_SUPPORTED:
        return message == _STALE_PLAN
    return code == sqlstate.INTERNAL_ERROR and message.startswith(_STALE_TYPE)


def _renew_stale(client: ClientConnection, server: ServerConnection, binds: list[str]) -> None:
    """A table changed under a statement of this batch: drop it here, rename it everywhere.

    The error does not say which statement of the batch failed, so every one bound in
    it is renewed; the cost is a Parse each on the next use.
    """
    stale = set(binds)
    registry = server.pool.statements
    for name in stale:
        if name in server.prepared:
            del server.prepared[name]
            server.to_close.append(name)
    statements = client.statements
    for client_name, stmt in list(statements.items()):
        if stmt.name in stale:
            statements[client_name] = registry.renew(stmt)
    log.info("server %s: re-preparing %d stale statement(s)", server.backend_pid, len(stale))


def _lost_track(server: ServerConnection, what: str) -> None:
    log.error("server %s: prepared-statement bookkeeping lost track (%s); closing the link", server.backend_pid, what)
    server.replies.clear()
    server.prepared.clear()
    server.close_needed = True


def on_unexpected(server: ServerConnection, msg_type: int) -> None:
    _lost_track(server, f"{chr(msg_type)!r} with nothing due")


def client_left(server: ServerConnection) -> None:
    """The client went away: replies still due cannot be told apart any more."""
    server.retry = None
    if server.retry_error is not None:
        server.retry_error = None
        server.close_needed = True  # its ReadyForQuery is still due
    if server.replies:
        server.replies.clear()
        server.prepared.clear()
        server.close_needed = True
