"""Admin console commands: PgBouncer's virtual database `pgbouncer`, on the simple query protocol.

`admin_users` may run everything, `stats_users` only SHOW; nobody else gets in. Commands
are a table (`SHOW_COMMANDS`, `COMMANDS`) over a small tokenizer; a bad command is an
ErrorResponse and the session carries on, as in PgBouncer. Result sets keep PgBouncer
1.25's column names, order and types so that its tooling (pgbouncer_exporter, runbooks)
reads them unchanged; columns pgfleet has nothing for say 0 or NULL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import views
from .client import ClientConnection, ClientError, ClientState
from .config import ConfigError, PoolerConfig
from .ini import DURATION_KEYS, is_unimplemented, parse_duration
from .pooler import RESTART_ONLY
from .protocol import backend
from .protocol import errors as sqlstate
from .protocol.errors import ProtocolError
from .protocol.framing import MessageReader, cstring, frame
from .protocol.frontend import parse_query
from .server import ServerState

if TYPE_CHECKING:
    from .pool import Pool
    from .pooler import Pooler

log = logging.getLogger("pgfleet.admin")

# What the console says it is. Tools pick their queries by the PgBouncer version in
# SHOW VERSION and server_version, so both name the release whose columns we keep.
PGBOUNCER_VERSION = "1.25.0"
VERSION_STRING = f"PgBouncer {PGBOUNCER_VERSION} (pgfleet)"

TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700

# Settings that SET may not change: the sockets are already bound, the processes started.
_NOT_SETTABLE = (*RESTART_ONLY, "workers")
_CONFIG_KEYS = tuple(key for key in PoolerConfig.model_fields if key not in ("databases", "users"))

# Parameters some drivers SET/SHOW blindly on connect; answered without effect (as PgBouncer).
_FAKE_PARAMS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

_EXTENDED = frozenset(map(ord, "PBDECSFHdcf"))
_Q, _X = ord("Q"), ord("X")
_PAUSE_POLL = 0.02  # seconds between checks while PAUSE / WAIT_CLOSE wait for servers


class AdminError(Exception):
    """Ends one command with an ErrorResponse; the session carries on."""

    def __init__(self, message: str, code: str = sqlstate.PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.code = code


# -- the command parser -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "word", "ident" (double-quoted), "string" (single-quoted), "=", ";"
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    verb: str  # lower case: "show", "pause", "set", ...
    arg: str  # the one argument ("" if none); for SET, the key
    value: str | None = None  # SET's value
    text: str = ""  # the query as sent, for error messages


def tokenize(sql: str) -> list[Token]:
    tokens: list[Token] = []
    pos, end = 0, len(sql)
    while pos < end:
        ch = sql[pos]
        if ch.isspace():
            pos += 1
        elif ch in "=;":
            tokens.append(Token(ch, ch))
            pos += 1
        elif ch in "\"'":
            text, pos = _quoted(sql, pos, ch)
            tokens.append(Token("ident" if ch == '"' else "string", text))
        else:
            start = pos
            while pos < end and not sql[pos].isspace() and sql[pos] not in "=;\"'":
                pos += 1
            tokens.append(Token("word", sql[start:pos]))
    return tokens


def _quoted(sql: str, pos: int, quote: str) -> tuple[str, int]:
    out: list[str] = []
    pos += 1
    while pos < len(sql):
        if sql[pos] == quote:
            if pos + 1 < len(sql) and sql[pos + 1] == quote:
                out.append(quote)
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(sql[pos])
        pos += 1
    raise AdminError(f"unterminated {quote}-quoted string", sqlstate.SYNTAX_ERROR)


def parse_command(sql: str) -> Command | None:
    """One console command; None for an empty query. Raises AdminError on bad syntax."""
    tokens = tokenize(sql)
    while tokens and tokens[-1].kind == ";":
        tokens.pop()
    if not tokens:
        return None
    bad = AdminError(f"invalid command '{sql.strip()}', use SHOW HELP;", sqlstate.SYNTAX_ERROR)
    if any(token.kind == ";" for token in tokens):
        raise AdminError("only one command per query on the admin console", sqlstate.SYNTAX_ERROR)
    head = tokens[0]
    if head.kind != "word":
        raise bad
    verb = head.text.lower()
    if verb == "set":
        # SET key = value | SET key TO value
        if len(tokens) != 4 or tokens[1].kind not in ("word", "ident"):
            raise bad
        if not (tokens[2].kind == "=" or (tokens[2].kind == "word" and tokens[2].text.lower() == "to")):
            raise bad
        if tokens[3].kind not in ("word", "ident", "string"):
            raise bad
        return Command("set", tokens[1].text.lower(), tokens[3].text, sql.strip())
    if len(tokens) > 2 or any(token.kind not in ("word", "ident") for token in tokens[1:]):
        raise bad
    arg = ""
    if len(tokens) == 2:
        # A bare word is folded to lower case as SQL does; a quoted name keeps its case.
        arg = tokens[1].text.lower() if tokens[1].kind == "word" else tokens[1].text
    return Command(verb, arg, text=sql.strip())


# -- result sets ---------------------------------------------------------------------------------

Columns = Sequence[tuple[str, int]]
Row = Sequence[object]


def _cell(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def result_set(columns: Columns, rows: Iterable[Row], tag: str = "SHOW") -> bytes:
    out = [backend.row_description(list(columns))]
    out.extend(backend.data_row([_cell(value) for value in row]) for row in rows)
    out.append(backend.command_complete(tag))
    return b"".join(out)


def _timestamp(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _setting_text(value: Any) -> str:
    """A setting as SHOW CONFIG prints it: PgBouncer style (0/1, comma lists, seconds)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if hasattr(value, "value"):
        return str(value.value)
    return str(value)


# Column lists of PgBouncer 1.25 (src/admin.c, src/stats.c), in order.
POOLS_COLUMNS: Columns = [
    ("database", TEXT), ("user", TEXT),
    ("cl_active", INT4), ("cl_waiting", INT4), ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4),
    ("sv_active", INT4), ("sv_active_cancel", INT4), ("sv_being_canceled", INT4), ("sv_idle", INT4),
    ("sv_used", INT4), ("sv_tested", INT4), ("sv_login", INT4),
    ("maxwait", INT4), ("maxwait_us", INT4), ("pool_mode", TEXT), ("load_balance_hosts", TEXT),
]  # fmt: skip
_STAT_FIELDS = (
    "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time", "query_time",
    "wait_time", "client_parse_count", "server_parse_count", "bind_count",
)  # fmt: skip
_AVG_NAMES = (
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time",
    "avg_query_time", "avg_wait_time", "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
)  # fmt: skip
STATS_COLUMNS: Columns = [
    ("database", TEXT),
    *((f"total_{name}", NUMERIC) for name in _STAT_FIELDS),
    *((name, NUMERIC) for name in _AVG_NAMES),
]
_TOTALS_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
    "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
)  # fmt: skip
STATS_TOTALS_COLUMNS: Columns = [("database", TEXT), *((name, NUMERIC) for name in _TOTALS_NAMES)]
STATS_AVERAGES_COLUMNS: Columns = [
    ("database", TEXT),
    *((name, NUMERIC) for name in _TOTALS_NAMES[:8]),
    ("avg_client_parse_count", NUMERIC), ("avg_server_parse_count", NUMERIC), ("avg_bind_count", NUMERIC),
]  # fmt: skip
SOCKET_COLUMNS: Columns = [
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT), ("state", TEXT),
    ("addr", TEXT), ("port", INT4), ("local_addr", TEXT), ("local_port", INT4),
    ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT4), ("wait_us", INT4), ("close_needed", INT4),
    ("ptr", TEXT), ("link", TEXT), ("remote_pid", INT4), ("tls", TEXT), ("application_name", TEXT),
    ("prepared_statements", INT4), ("id", INT4),
]  # fmt: skip
DATABASES_COLUMNS: Columns = [
    ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT), ("force_user", TEXT),
    ("pool_size", INT4), ("min_pool_size", INT4), ("reserve_pool_size", INT4), ("server_lifetime", INT4),
    ("pool_mode", TEXT), ("load_balance_hosts", TEXT), ("max_connections", INT4), ("current_connections", INT4),
    ("max_client_connections", INT4), ("current_client_connections", INT4), ("paused", INT4), ("disabled", INT4),
]  # fmt: skip
USERS_COLUMNS: Columns = [
    ("name", TEXT), ("pool_size", TEXT), ("reserve_pool_size", TEXT), ("pool_mode", TEXT),
    ("max_user_connections", INT4), ("current_connections", INT4),
    ("max_user_client_connections", INT4), ("current_client_connections", INT4),
]  # fmt: skip
SOCKETS_COLUMNS: Columns = [
    *SOCKET_COLUMNS[:17],
    ("recv_pos", INT4), ("pkt_pos", INT4), ("pkt_remain", INT4), ("send_pos", INT4), ("send_remain", INT4),
    ("pkt_avail", INT4), ("send_avail", INT4),
]  # fmt: skip
MEM_COLUMNS: Columns = [("name", TEXT), ("size", INT4), ("used", INT4), ("free", INT4), ("memtotal", INT4)]
DNS_HOSTS_COLUMNS: Columns = [("hostname", TEXT), ("ttl", INT8), ("addrs", TEXT)]
DNS_ZONES_COLUMNS: Columns = [("zonename", TEXT), ("serial", INT8), ("count", INT4)]
LISTS_COLUMNS: Columns = [("list", TEXT), ("items", INT4)]
CONFIG_COLUMNS: Columns = [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)]
VERSION_COLUMNS: Columns = [("version", TEXT)]
STATE_COLUMNS: Columns = [("key", TEXT), ("value", TEXT)]
TOTALS_COLUMNS: Columns = [("name", TEXT), ("value", NUMERIC)]
PEERS_COLUMNS: Columns = [("peer_id", INT4), ("host", TEXT), ("port", INT4), ("pool_size", INT4)]
PEER_POOLS_COLUMNS: Columns = [
    ("peer_id", INT4), ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4),
    ("sv_active_cancel", INT4), ("sv_login", INT4),
]  # fmt: skip

HELP_TEXT = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION"
    "\n\tSHOW PEERS|PEER_POOLS"
    "\n\tSHOW SOCKETS|ACTIVE_SOCKETS|MEM|DNS_HOSTS|DNS_ZONES"
    "\n\tSHOW LISTS|STATE"
    "\n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS"
    "\n\tSET key = arg"
    "\n\tRELOAD"
    "\n\tPAUSE [<db>]"
    "\n\tRESUME [<db>]"
    "\n\tRECONNECT [<db>]"
    "\n\tKILL [<db>]"
    "\n\tKILL_CLIENT <id>"
    "\n\tSUSPEND"
    "\n\tDISABLE <db>"
    "\n\tENABLE <db>"
    "\n\tSHUTDOWN"
    "\n\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS"
    "\n\tWAIT_CLOSE [<db>]"
)


def _stats_row(stats: dict[str, int]) -> list[int]:
    """PgBouncer's stat counters from pgfleet's PoolStats (summed over a database)."""
    return [
        stats["server_assignment_count"],
        stats["xact_count"],
        stats["query_count"],
        stats["bytes_received"],
        stats["bytes_sent"],
        stats["xact_time"],
        stats["query_time"],
        stats["wait_time"],
        stats["client_parse_count"],
        stats["server_parse_count"],
        stats["bind_count"],
    ]


# -- the console ----------------------------------------------------------------------------------


class AdminConsole:
    """The pooler's admin console: sessions, pause state and the stats period."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.sessions: set[AdminSession] = set()
        self.paused_all = False
        self.paused_databases: set[str] = set()
        # The whole-pooler PAUSE came from the control port (PUT /pause), whose resume lifts
        # only its own pause: a PAUSE typed on the console is the console's to RESUME.
        self.paused_by_control = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Averages are over the last full stats_period, from two snapshots (as PgBouncer).
        now = pooler.loop.time()
        self._old_stamp = now - 1.0
        self._new_stamp = now
        self._older: dict[str, dict[str, int]] = {}
        self._newer: dict[str, dict[str, int]] = {}
        self._stats_timer: asyncio.TimerHandle | None = pooler.loop.call_later(
            pooler.config.stats_period, self._refresh_stats
        )

    # -- hooks the pooler calls -------------------------------------------------------------------
    async def login(self, client: ClientConnection) -> None:
        """Password auth succeeded for database `pgbouncer`: admit admins and stats users only."""
        config = self.pooler.config
        if client.is_admin or client.user in config.admin_users:  # is_admin: the peer rule (client.py)
            is_admin = True
        elif client.user in config.stats_users:
            is_admin = False
        else:
            raise ClientError(
                sqlstate.INVALID_AUTHORIZATION,
                f'not allowed: user "{client.user}" is in neither admin_users nor stats_users',
            )
        assert client.transport is not None
        client.is_admin = is_admin
        client.cancel_key = self.pooler.register_cancel_key(client)
        welcome = {
            "server_version": f"{PGBOUNCER_VERSION}/bouncer",
            "client_encoding": "UTF8",
            "server_encoding": "UTF8",
            "DateStyle": "ISO",
            "TimeZone": "GMT",
            "standard_conforming_strings": "on",
            "is_superuser": "on" if is_admin else "off",
            "application_name": client.params.get("application_name", ""),
        }
        out = [backend.parameter_status(name, value) for name, value in welcome.items()]
        out.append(backend.backend_key_data(*client.cancel_key))
        out.append(backend.ready_for_query())
        client.transport.write(b"".join(out))
        # Bytes that arrived behind the password message are the first queries.
        client._pending = client.take_login_leftover() + client._pending
        session = AdminSession(self, client, is_admin)
        self.sessions.add(session)
        # The session outlives the login (and its client_login_timeout): its own task.
        task = self.pooler.loop.create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if config.log_connections:
            log.info("admin login: %s from %s:%s", client.user, *client.address)

    def pool_created(self, pool: Pool) -> None:
        """A new pool for a database that is paused starts paused."""
        if self.is_paused(pool.database):
            pool.paused = True

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    # -- stats period -----------------------------------------------------------------------------
    def _refresh_stats(self) -> None:
        self._stats_timer = None
        if self.pooler._stopped.done():
            return
        self._old_stamp, self._new_stamp = self._new_stamp, self.pooler.loop.time()
        self._older = self._newer
        self._newer = {
            name: views.sum_stats(views.pools_of(self.pooler, name)) for name in views.database_names(self.pooler)
        }
        self._stats_timer = self.pooler.loop.call_later(self.pooler.config.stats_period, self._refresh_stats)

    def averages(self, database: str, current: dict[str, int]) -> list[int]:
        """PgBouncer's avg_* for one database: rates per second, times per event (µs)."""
        old = self._older.get(database, {})
        span = self.pooler.loop.time() - self._old_stamp

        def delta(key: str) -> int:
            return current.get(key, 0) - old.get(key, 0)

        if span <= 0:
            return [0] * len(_AVG_NAMES)
        xacts, queries = delta("xact_count"), delta("query_count")

        def rate(key: str) -> int:
            return int(delta(key) / span)

        return [
            rate("server_assignment_count"),
            rate("xact_count"),
            rate("query_count"),
            rate("bytes_received"),
            rate("bytes_sent"),
            delta("xact_time") // xacts if xacts else 0,
            delta("query_time") // queries if queries else 0,
            delta("wait_time") // xacts if xacts else 0,
            rate("client_parse_count"),
            rate("server_parse_count"),
            rate("bind_count"),
        ]

    # -- pause, resume, wait ------------------------------------------------------------------------
    def _target_pools(self, database: str) -> list[Pool]:
        return views.pools_of(self.pooler, database or None)

    def _check_database(self, database: str, verb: str) -> None:
        if database == views.ADMIN_DATABASE:
            raise AdminError(f"cannot {verb} admin db: {database}", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
        if self.pooler.config.database(database) is None:
            raise AdminError(f"no such database: {database}", sqlstate.PROTOCOL_VIOLATION)  # PgBouncer's code

    async def wait_servers_gone(self, database: str, still_paused: Callable[[], bool]) -> None:
        """PAUSE's wait: close idle servers as they come back until none is left."""
        while still_paused():
            pools = self._target_pools(database)
            for pool in pools:
                pool.close_idle(len(pool.idle))
            if all(pool.server_count == 0 for pool in pools):
                return
            await asyncio.sleep(_PAUSE_POLL)

    def resume_pools(self) -> None:
        for pool in self.pooler.pools.values():
            if pool.paused and not self.is_paused(pool.database):
                pool.resume()

    # -- the whole pooler's PAUSE and RESUME, for whatever asks (control port, signals) --------------
    def pause_all(self) -> None:
        """PAUSE without waiting: transactions in flight finish, new ones queue, servers close as they
        come back. Idempotent; `servers_open()` says how far it got."""
        self.paused_all = True
        for pool in self.pooler.pools.values():
            pool.paused = True
        task = self.pooler.loop.create_task(self.wait_servers_gone("", lambda: self.paused_all))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_paused(self) -> None:
        """PAUSEd before the pooler accepts anyone (start_paused, or its supervisor's pause): as a
        PUT /pause that came first, so the control port's RESUME lifts it. No pool exists yet;
        each starts paused (`pool_created`) and never opens a server until RESUME."""
        self.paused_all = True
        self.paused_by_control = True

    def resume_all(self) -> None:
        """Lift the whole-pooler PAUSE (a PAUSE or KILL of one database stays): queued clients go on."""
        self.paused_all = False
        self.paused_by_control = False
        self.resume_pools()

    def servers_open(self) -> int:
        return sum(pool.server_count for pool in self.pooler.pools.values())


class AdminSession:
    """One admin console connection: read simple queries, answer them in order."""

    def __init__(self, console: AdminConsole, client: ClientConnection, is_admin: bool) -> None:
        self.console = console
        self.pooler = console.pooler
        self.client = client
        self.is_admin = is_admin

    async def run(self) -> None:
        client = self.client
        reader = MessageReader(max_length=1 << 20)
        try:
            while not _closed(client):
                data, client._pending = client._pending, b""
                reader.feed(data)
                for msg_type, body in reader.messages():
                    if msg_type == _Q:
                        await self.execute(parse_query(body))
                    elif msg_type == _X:
                        client.close()
                        return
                    elif msg_type in _EXTENDED:
                        client.terminate(
                            sqlstate.FEATURE_NOT_SUPPORTED,
                            "extended query protocol not supported by admin console; use the simple query protocol",
                        )
                        return
                    else:
                        client.terminate(
                            sqlstate.PROTOCOL_VIOLATION, f"unsupported message {chr(msg_type)!r} for admin console"
                        )
                        return
                try:
                    await client._wait_for_data()
                except asyncio.CancelledError:
                    if _closed(client):
                        return  # the connection went away while we waited for it
                    raise
        except ProtocolError as exc:
            client.terminate(exc.code, str(exc))
        finally:
            self.console.sessions.discard(self)

    async def execute(self, sql: str) -> None:
        try:
            command = parse_command(sql)
            if command is None:
                self.client.send(backend.empty_query_response() + backend.ready_for_query())
                return
            reply = await self.dispatch(command)
        except AdminError as exc:
            self.client.send(backend.error_response(exc.code, str(exc)) + backend.ready_for_query())
            return
        if reply is not None:
            self.client.send(reply + backend.ready_for_query())

    async def dispatch(self, command: Command) -> bytes | None:
        if command.verb in ("show", "select"):
            return self.show(command)
        if command.verb == "set":
            if self.is_admin:
                self._check_whole_pooler(command)
            return self.cmd_set(command.arg, command.value or "")
        handler = COMMANDS.get(command.verb)
        if handler is None:
            raise AdminError(f"invalid command '{command.text}', use SHOW HELP;", sqlstate.SYNTAX_ERROR)
        if not self.is_admin:
            raise AdminError("admin access needed", sqlstate.INSUFFICIENT_PRIVILEGE)
        self._check_whole_pooler(command)
        return await handler(self, command.arg)

    def _check_whole_pooler(self, command: Command) -> None:
        """With several workers this console is one worker's: refuse what would act on it alone."""
        slot = self.pooler.slot
        if slot.single or (command.verb == "set" and command.arg in _FAKE_PARAMS):
            return
        raise AdminError(
            f"{command.verb.upper()} would act on worker {slot.index + 1} of {slot.count} only "
            "(this console connection landed there); change the whole pooler with SIGHUP, SIGTERM "
            "or the HTTP port (PUT /limits, POST /drain)",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )

    # -- SHOW ---------------------------------------------------------------------------------------
    def show(self, command: Command) -> bytes:
        what = command.arg
        if what in _FAKE_PARAMS:
            return result_set([(what, TEXT)], [[_FAKE_PARAMS[what]]])
        handler = SHOW_COMMANDS.get(what)
        if handler is None:
            raise AdminError(f"invalid command '{command.text}', use SHOW HELP;", sqlstate.SYNTAX_ERROR)
        return handler(self)

    def show_help(self) -> bytes:
        # PgBouncer sends the command list as the DETAIL of a NOTICE, not as rows.
        fields = b"SNOTICE\x00VNOTICE\x00C00000\x00" + b"M" + cstring("Console usage") + b"D" + cstring(HELP_TEXT)
        return frame(b"N", fields + b"\x00") + backend.command_complete("SHOW")

    def show_version(self) -> bytes:
        return result_set(VERSION_COLUMNS, [[VERSION_STRING]])

    def show_pools(self) -> bytes:
        now = self.pooler.loop.time()
        rows: list[Row] = []
        for pool in self.pooler.pools.values():
            counts = views.pool_counts(pool, now)
            wait_us = int(counts.maxwait * 1_000_000)
            rows.append(
                [
                    pool.database, pool.user,
                    counts.cl_active, counts.cl_waiting, 0, 0,
                    counts.sv_active, 0, 0, counts.sv_idle, counts.sv_used, counts.sv_tested, counts.sv_login,
                    wait_us // 1_000_000, wait_us % 1_000_000, pool.mode.value, None,
                ]
            )  # fmt: skip
        admins = len(self.console.sessions)
        rows.append([views.ADMIN_DATABASE, "pgbouncer", admins, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "statement", None])
        return result_set(POOLS_COLUMNS, rows)

    def _stats_by_database(self) -> list[tuple[str, dict[str, int]]]:
        out = [(name, views.sum_stats(views.pools_of(self.pooler, name))) for name in views.database_names(self.pooler)]
        out.append((views.ADMIN_DATABASE, {}))
        return out

    def show_stats(self) -> bytes:
        rows: list[Row] = []
        for name, stats in self._stats_by_database():
            totals = _stats_row(stats) if stats else [0] * len(_STAT_FIELDS)
            rows.append([name, *totals, *self.console.averages(name, stats)])
        return result_set(STATS_COLUMNS, rows)

    def show_stats_totals(self) -> bytes:
        rows = [
            [name, *(_stats_row(stats) if stats else [0] * len(_STAT_FIELDS))]
            for name, stats in self._stats_by_database()
        ]
        return result_set(STATS_TOTALS_COLUMNS, rows)

    def show_stats_averages(self) -> bytes:
        rows = [[name, *self.console.averages(name, stats)] for name, stats in self._stats_by_database()]
        return result_set(STATS_AVERAGES_COLUMNS, rows)

    def show_totals(self) -> bytes:
        stats = views.sum_stats(self.pooler.pools.values())
        totals = _stats_row(stats) if stats else [0] * len(_STAT_FIELDS)
        averages = self.console.averages("", stats)
        rows = [[f"total_{name}", value] for name, value in zip(_TOTALS_NAMES, totals, strict=True)]
        rows += [[name, value] for name, value in zip(_AVG_NAMES, averages, strict=True)]
        return result_set(TOTALS_COLUMNS, rows)

    def _socket_row(
        self,
        kind: str,
        user: str,
        database: str,
        state: str,
        addr: tuple[Any, ...],
        local: tuple[Any, ...],
        connected: float,
        requested: float,
        wait: float,
        close_needed: bool,
        obj: object,
        link: object | None,
        remote_pid: int,
        app_name: str,
        prepared: int,
        ident: int,
    ) -> Row:
        wait_us = int(max(0.0, wait) * 1_000_000)
        return [
            kind, user, database, "none", state,
            str(addr[0]) if addr else "", int(addr[1]) if len(addr) > 1 else 0,
            str(local[0]) if local else "", int(local[1]) if len(local) > 1 else 0,
            _timestamp(views.wall_clock(self.pooler, connected)), _timestamp(views.wall_clock(self.pooler, requested)),
            wait_us // 1_000_000, wait_us % 1_000_000, int(close_needed),
            f"{id(obj):#x}", f"{id(link):#x}" if link is not None else "", remote_pid,
            getattr(obj, "tls", ""), app_name,  # a client's or a server's TLS version/cipher
            prepared, ident,
        ]  # fmt: skip

    def _client_row(self, client: ClientConnection, database: str, state: str, now: float) -> Row:
        wait = now - client.wait_start if client.state is ClientState.WAITING else 0.0
        local = client.transport.get_extra_info("sockname") if client.transport is not None else None
        return self._socket_row(
            "C", client.user, database, state, client.address, tuple(local) if isinstance(local, tuple) else (),
            client.connect_time, client.request_time, wait, False, client, client.server, 0,
            client.params.get("application_name", ""), 0, client.id,
        )  # fmt: skip

    def show_clients(self) -> bytes:
        return result_set(SOCKET_COLUMNS, self._client_rows())

    def show_servers(self) -> bytes:
        return result_set(SOCKET_COLUMNS, self._server_rows())

    def _client_rows(self) -> list[Row]:
        now = self.pooler.loop.time()
        rows: list[Row] = []
        for pool in self.pooler.pools.values():
            for client in pool.clients.values():
                if client.state is ClientState.CLOSED:
                    continue
                state = {ClientState.ACTIVE: "active", ClientState.WAITING: "waiting"}.get(client.state, "idle")
                rows.append(self._client_row(client, pool.database, state, now))
        for session in self.console.sessions:
            rows.append(self._client_row(session.client, views.ADMIN_DATABASE, "active", now))
        return rows

    def _server_rows(self) -> list[Row]:
        rows: list[Row] = []
        for pool in self.pooler.pools.values():
            servers = [(s, "active" if s.client is not None else "tested") for s in pool.active]
            servers += [(s, "idle") for s in pool.idle]
            for server, state in servers:
                if server.state is ServerState.CLOSED:
                    continue
                client = server.client
                rows.append(
                    self._socket_row(
                        "S",
                        pool.server_user,
                        pool.database,
                        state,
                        server.address,
                        server.local_address,
                        server.created_at,
                        server.last_used,
                        0.0,
                        server.close_needed,
                        server,
                        client,
                        server.backend_pid,
                        client.params.get("application_name", "") if client is not None else "",
                        len(server.prepared),
                        server.backend_pid,
                    )
                )
        return rows

    def show_databases(self) -> bytes:
        pooler = self.pooler
        config = pooler.config
        rows: list[Row] = []
        for name in views.database_names(pooler):
            db = views.database_config(pooler, name)
            limits = pooler.limits_for(name)
            rows.append(
                [
                    name, db.host, db.port, db.dbname or name, db.user,
                    limits.pool_size, limits.min_pool_size, limits.reserve_pool_size,
                    int(config.server_lifetime),
                    db.pool_mode.value if db.pool_mode is not None else None, None,
                    limits.max_db_connections, pooler.database_server_count(name),
                    config.client_limits_for(name, "")[0], pooler.database_clients.get(name, 0),
                    int(self.console.is_paused(name)), int(name in pooler.disabled_databases),
                ]
            )  # fmt: skip
        rows.append(
            [
                views.ADMIN_DATABASE, None, pooler.port, views.ADMIN_DATABASE, "pgbouncer", 2, 0, 0,
                int(config.server_lifetime), "statement", None, 0, 0, 0, len(self.console.sessions), 0, 0,
            ]
        )  # fmt: skip
        return result_set(DATABASES_COLUMNS, rows)

    def show_users(self) -> bytes:
        config = self.pooler.config
        names = list(dict.fromkeys([*config.users, *(user for _db, user in self.pooler.pools)]))
        rows: list[Row] = []
        for name in names:
            entry = config.users.get(name)
            limits = self.pooler.limits_for("*", name)  # a user's override wins over any database's
            rows.append(
                [
                    name,
                    f"{limits.pool_size:9d}" if entry and entry.pool_size is not None else "",
                    f"{limits.reserve_pool_size:9d}" if entry and entry.reserve_pool_size is not None else "",
                    entry.pool_mode.value if entry and entry.pool_mode is not None else None,
                    limits.max_user_connections,
                    self.pooler.user_server_count(name),
                    config.client_limits_for("*", name)[1], self.pooler.user_clients.get(name, 0),
                ]
            )  # fmt: skip
        return result_set(USERS_COLUMNS, rows)

    def show_lists(self) -> bytes:
        return result_set(LISTS_COLUMNS, [[name, value] for name, value in views.lists(self.pooler).items()])

    def show_config(self) -> bytes:
        config = self.pooler.config
        rows: list[Row] = []
        for key in sorted(_CONFIG_KEYS):
            field = PoolerConfig.model_fields[key]
            default = field.get_default(call_default_factory=True)
            rows.append(
                [
                    key,
                    _setting_text(getattr(config, key)),
                    _setting_text(default),
                    "no" if key in _NOT_SETTABLE else "yes",
                ]
            )
        return result_set(CONFIG_COLUMNS, rows)

    def show_state(self) -> bytes:
        paused = self.console.paused_all
        return result_set(
            STATE_COLUMNS,
            [["active", "no" if paused else "yes"], ["paused", "yes" if paused else "no"], ["suspended", "no"]],
        )

    def show_sockets(self) -> bytes:
        """Every client and server socket, in SHOW CLIENTS' terms plus PgBouncer's buffer
        columns (pgfleet keeps no per-socket packet buffer: they are 0)."""
        rows = [[*row, 0, 0, 0, 0, 0, 0, 0] for row in self._socket_rows()]
        return result_set(SOCKETS_COLUMNS, rows)

    def show_active_sockets(self) -> bytes:
        return result_set(
            SOCKETS_COLUMNS, [[*row, 0, 0, 0, 0, 0, 0, 0] for row in self._socket_rows() if row[4] == "active"]
        )

    def _socket_rows(self) -> list[list[object]]:
        return [list(row)[:17] for row in (*self._client_rows(), *self._server_rows())]

    def show_mem(self) -> bytes:
        """PgBouncer's slab caches; pgfleet's objects are Python's: counts, no sizes."""
        pooler = self.pooler
        servers = sum(len(pool.idle) + len(pool.active) for pool in pooler.pools.values())
        rows = [
            ["client_cache", 0, len(pooler.clients), 0, 0],
            ["server_cache", 0, servers, 0, 0],
            ["pool_cache", 0, len(pooler.pools), 0, 0],
        ]
        return result_set(MEM_COLUMNS, rows)

    def show_dns_hosts(self) -> bytes:
        return result_set(DNS_HOSTS_COLUMNS, [])  # no DNS cache: every connect asks the resolver

    def show_dns_zones(self) -> bytes:
        return result_set(DNS_ZONES_COLUMNS, [])

    def show_peers(self) -> bytes:
        return result_set(PEERS_COLUMNS, [])

    def show_peer_pools(self) -> bytes:
        return result_set(PEER_POOLS_COLUMNS, [])

    # -- commands that change things -------------------------------------------------------------
    def cmd_set(self, key: str, value: str) -> bytes:
        if key in _FAKE_PARAMS:
            return backend.notice_response("00000", "SET ignored") + backend.command_complete("SET")
        if not self.is_admin:
            raise AdminError("admin access needed", sqlstate.INSUFFICIENT_PRIVILEGE)
        if is_unimplemented(key):
            raise AdminError(
                f"SET failed: {key} is a PgBouncer setting pgfleet does not implement (see docs/compatibility.md)",
                sqlstate.FEATURE_NOT_SUPPORTED,
            )
        if key not in _CONFIG_KEYS:
            raise AdminError(f"SET failed: unknown setting {key!r}", sqlstate.INVALID_CATALOG_NAME)
        if key in _NOT_SETTABLE:
            raise AdminError(
                f"SET failed: {key} cannot change while running; change the config file and restart",
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
            )
        parsed: object = value
        try:
            if key in DURATION_KEYS:
                parsed = parse_duration(value, key, "SET")
            self.pooler.set_limits({key: parsed})
        except ConfigError as exc:
            raise AdminError(f"SET failed: {exc}", sqlstate.PROTOCOL_VIOLATION) from None
        log.info("SET %s = %s (by %s)", key, value, self.client.user)
        return backend.command_complete(f"SET {key}={value}")

    async def cmd_reload(self, arg: str) -> bytes:
        _no_argument("RELOAD", arg)
        if self.pooler.config_path is None:
            raise AdminError("RELOAD failed: the pooler was started without a config file", "F0000")
        log.info("RELOAD command issued")
        try:
            self.pooler.reload()
        except ConfigError as exc:
            raise AdminError(f"RELOAD failed: {exc}", "F0000") from None
        return backend.command_complete("RELOAD")

    async def cmd_pause(self, database: str) -> bytes:
        console = self.console
        if console.paused_all:
            raise AdminError("already suspended/paused", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
        if database:
            console._check_database(database, "pause")
            log.info("PAUSE '%s' command issued", database)
            console.paused_databases.add(database)
        else:
            log.info("PAUSE command issued")
            console.paused_all = True
        for pool in console._target_pools(database):
            pool.paused = True
        await console.wait_servers_gone(database, lambda: console.is_paused(database))
        return backend.command_complete("PAUSE")

    async def cmd_resume(self, database: str) -> bytes:
        console = self.console
        if database:
            if database not in console.paused_databases:
                raise AdminError(f"database {database} is not paused", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
            log.info("RESUME '%s' command issued", database)
            console.paused_databases.discard(database)
        else:
            if self.pooler.draining:
                raise AdminError("pooler is shutting down", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
            if not console.paused_all and not console.paused_databases:
                raise AdminError("pooler is not paused/suspended", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
            log.info("RESUME command issued")
            console.paused_all = False
            console.paused_by_control = False
            console.paused_databases.clear()
        console.resume_pools()
        return backend.command_complete("RESUME")

    async def cmd_kill(self, database: str) -> bytes:
        console = self.console
        if console.paused_all:
            raise AdminError("already suspended/paused", sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE)
        if database:
            console._check_database(database, "kill")
            names = [database]
        else:
            names = views.database_names(self.pooler)
        log.info("KILL %s command issued", database or "(all)")
        # New clients of a killed database wait for RESUME, as in PgBouncer.
        console.paused_databases.update(names)
        for pool in console._target_pools(database):
            pool.paused = True
            for client in list(pool.clients.values()):
                client.terminate(sqlstate.ADMIN_SHUTDOWN, "database killed by admin (KILL)")
            pool.close_all("KILL", active=True)
        return backend.command_complete("KILL")

    async def cmd_kill_client(self, arg: str) -> bytes:
        """KILL_CLIENT <id> (SHOW CLIENTS' id): close that client now; a query of its in
        flight is cancelled and its server closed, a transaction rolled back."""
        if not arg.isdigit():
            raise AdminError("KILL_CLIENT needs a client id (SHOW CLIENTS)", sqlstate.SYNTAX_ERROR)
        for client in list(self.pooler.clients):
            if client.id == int(arg):
                log.info("KILL_CLIENT %s command issued (%r)", arg, client)
                client.terminate(sqlstate.ADMIN_SHUTDOWN, "client killed by admin (KILL_CLIENT)")
                return backend.command_complete("KILL_CLIENT")
        raise AdminError(f"client {arg} not found", sqlstate.PROTOCOL_VIOLATION)

    async def cmd_suspend(self, arg: str) -> bytes:
        _no_argument("SUSPEND", arg)
        # SUSPEND readies PgBouncer's online restart (-R), handing its sockets to a new process.
        raise AdminError(
            "SUSPEND is for PgBouncer's online restart, which pgfleet does not have: use PAUSE, or a "
            "rolling restart (SIGTERM drains; workers share the port)",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )

    async def cmd_disable(self, database: str) -> bytes:
        if not database:
            raise AdminError("DISABLE needs a database name", sqlstate.SYNTAX_ERROR)
        self.console._check_database(database, "disable")
        log.info("DISABLE '%s' command issued", database)
        self.pooler.disabled_databases.add(database)
        return backend.command_complete("DISABLE")

    async def cmd_enable(self, database: str) -> bytes:
        if not database:
            raise AdminError("ENABLE needs a database name", sqlstate.SYNTAX_ERROR)
        self.console._check_database(database, "enable")
        log.info("ENABLE '%s' command issued", database)
        self.pooler.disabled_databases.discard(database)
        return backend.command_complete("ENABLE")

    async def cmd_reconnect(self, database: str) -> bytes:
        if database:
            self.console._check_database(database, "reconnect")
        log.info("RECONNECT %s command issued", database or "(all)")
        for pool in self.console._target_pools(database):
            pool.close_idle(len(pool.idle))
            for server in pool.active:
                # Closed when its client is done with it (pool.release), never mid-transaction.
                server.close_needed = True
            pool.close_sessions_marked_to_close()
        return backend.command_complete("RECONNECT")

    async def cmd_wait_close(self, database: str) -> bytes:
        if database:
            self.console._check_database(database, "wait in")
        log.info("WAIT_CLOSE %s command issued", database or "(all)")
        while True:
            pools = self.console._target_pools(database)
            if not any(server.close_needed for pool in pools for server in (*pool.active, *pool.idle)):
                return backend.command_complete("WAIT_CLOSE")
            await asyncio.sleep(_PAUSE_POLL)

    async def cmd_shutdown(self, mode: str) -> bytes | None:
        pooler = self.pooler
        if mode == "":
            log.info("SHUTDOWN command issued")
            pooler.loop.create_task(pooler.stop())
            return None  # as PgBouncer: no answer, the connection ends with the process
        if mode == "wait_for_clients":
            log.info("SHUTDOWN WAIT_FOR_CLIENTS command issued")
            self.client.send(backend.command_complete("SHUTDOWN") + backend.ready_for_query())
            pooler.drain()
            return None
        if mode == "wait_for_servers":
            log.info("SHUTDOWN WAIT_FOR_SERVERS command issued")
            self.client.send(backend.command_complete("SHUTDOWN") + backend.ready_for_query())
            self._shutdown_when_servers_released()
            return None
        raise AdminError(f"invalid command 'SHUTDOWN {mode}', use SHOW HELP;", sqlstate.SYNTAX_ERROR)

    def _shutdown_when_servers_released(self) -> None:
        """PAUSE, stop accepting, drop queued clients, exit once every server is back."""
        pooler = self.pooler
        console = self.console
        console.paused_all = True
        pooler.draining = True
        pooler.refusing_servers = True
        pooler._close_listeners(keep_unix=True)
        for pool in pooler.pools.values():
            pool.paused = True
            waiting, pool.waiting = list(pool.waiting), type(pool.waiting)()
            for client in waiting:
                client.terminate(sqlstate.PROTOCOL_VIOLATION, "server shutting down")

        async def finish() -> None:
            await console.wait_servers_gone("", lambda: True)
            await pooler.stop()

        task = pooler.loop.create_task(finish())
        console._tasks.add(task)
        task.add_done_callback(console._tasks.discard)


def _closed(client: ClientConnection) -> bool:
    # A function, so that type checkers do not carry a narrowed state across awaits.
    return client.state is ClientState.CLOSED


def _no_argument(verb: str, arg: str) -> None:
    if arg:
        raise AdminError(f"invalid command '{verb} {arg}', use SHOW HELP;", sqlstate.SYNTAX_ERROR)


# The command tables (PgBouncer's show_map and cmd_list).
SHOW_COMMANDS: dict[str, Callable[[AdminSession], bytes]] = {
    "clients": AdminSession.show_clients,
    "config": AdminSession.show_config,
    "databases": AdminSession.show_databases,
    "help": AdminSession.show_help,
    "lists": AdminSession.show_lists,
    "peers": AdminSession.show_peers,
    "sockets": AdminSession.show_sockets,
    "active_sockets": AdminSession.show_active_sockets,
    "mem": AdminSession.show_mem,
    "dns_hosts": AdminSession.show_dns_hosts,
    "dns_zones": AdminSession.show_dns_zones,
    "peer_pools": AdminSession.show_peer_pools,
    "pools": AdminSession.show_pools,
    "servers": AdminSession.show_servers,
    "state": AdminSession.show_state,
    "stats": AdminSession.show_stats,
    "stats_totals": AdminSession.show_stats_totals,
    "stats_averages": AdminSession.show_stats_averages,
    "totals": AdminSession.show_totals,
    "users": AdminSession.show_users,
    "version": AdminSession.show_version,
}
COMMANDS: dict[str, Callable[[AdminSession, str], Awaitable[bytes | None]]] = {
    "kill": AdminSession.cmd_kill,
    "kill_client": AdminSession.cmd_kill_client,
    "suspend": AdminSession.cmd_suspend,
    "disable": AdminSession.cmd_disable,
    "enable": AdminSession.cmd_enable,
    "pause": AdminSession.cmd_pause,
    "reconnect": AdminSession.cmd_reconnect,
    "reload": AdminSession.cmd_reload,
    "resume": AdminSession.cmd_resume,
    "shutdown": AdminSession.cmd_shutdown,
    "wait_close": AdminSession.cmd_wait_close,
}
