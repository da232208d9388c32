"""PgBouncer's INI format, read into the pooler's own config terms (the drop-in path).

A team can point `pgfleet-pooler --config pgbouncer.ini` at the file it already runs
PgBouncer with. Settings pgfleet honours are mapped onto `PoolerConfig`; settings it
knows and does not implement (log files, TCP tuning, DNS, ...) are named in one
warning each and skipped; anything else is an error naming the key, as a misspelt key
in the YAML format is.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .config import AuthType, ConfigError, DatabaseConfig, PoolerConfig, UserConfig

log = logging.getLogger("pgfleet.ini")

# Settings measured in seconds. PgBouncer reads a bare number as seconds; a unit suffix
# is accepted too, so a value copied from elsewhere does not silently change meaning.
DURATION_KEYS = frozenset(
    {
        "reserve_pool_timeout",
        "server_idle_timeout",
        "server_lifetime",
        "server_connect_timeout",
        "server_login_retry",
        "server_check_delay",
        "query_wait_timeout",
        "query_wait_notify",
        "query_timeout",
        "client_idle_timeout",
        "client_login_timeout",
        "idle_transaction_timeout",
        "transaction_timeout",
        "shutdown_timeout",
        "stats_period",
    }
)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|ms|s|min|h|d)?\s*$")

# [pgbouncer] settings PgBouncer has and pgfleet does not act on: warned about, skipped.
IGNORED_PGBOUNCER_KEYS = frozenset(
    {
        # process management and logging
        "logfile",
        "pidfile",
        "syslog",
        "syslog_ident",
        "syslog_facility",
        "user",
        "service_name",
        "job_name",
        "conffile",
        "log_stats",
        "log_level",
        # sockets and TCP tuning
        "so_reuseport",
        "listen_backlog",
        "unix_socket_mode",
        "unix_socket_group",
        "tcp_defer_accept",
        "tcp_socket_buffer",
        "tcp_keepalive",
        "tcp_keepcnt",
        "tcp_keepidle",
        "tcp_keepintvl",
        "tcp_user_timeout",
        "pkt_buf",
        "sbuf_loopcnt",
        "max_packet_size",
        "peer_id",
        # DNS
        "dns_max_ttl",
        "dns_nxdomain_ttl",
        "dns_zone_check_period",
        "resolv_conf",
        # authentication pgfleet does not implement
        "auth_ident_file",
        "auth_ldap_options",
        "scram_iterations",
        # routing
        "server_round_robin",
        "disable_pqexec",
        "application_name_add_host",
        "autodb_idle_timeout",
        "suspend_timeout",
        "cancel_wait_timeout",
        "track_extra_parameters",
        "stats_users_prefix",
    }
)
# TLS settings pgfleet does not have (TLS 1.3 cipher suites, DH/ECDH parameters) are
# skipped alike; the rest are PoolerConfig fields.
_IGNORED_PREFIXES = ("client_tls_", "server_tls_", "client_tls13_", "server_tls13_")

# [databases] connection-string keys pgfleet does not act on.
IGNORED_DATABASE_KEYS = frozenset(
    {
        "auth_user",
        "auth_query",
        "auth_dbname",
        "client_encoding",
        "datestyle",
        "timezone",
        "application_name",
        "load_balance_hosts",
    }
)
# PgBouncer spells some per-database keys differently from the global ones.
_DATABASE_ALIASES = {"reserve_pool": "reserve_pool_size"}
IGNORED_USER_KEYS: frozenset[str] = frozenset()

_SUPPORTED_PGBOUNCER_KEYS = frozenset(PoolerConfig.model_fields) - {"databases", "users"}
_SUPPORTED_DATABASE_KEYS = frozenset(DatabaseConfig.model_fields)
_SUPPORTED_USER_KEYS = frozenset(UserConfig.model_fields)
_SUPPORTED_AUTH_TYPES = tuple(auth_type.value for auth_type in AuthType)


def parse_duration(value: str, key: str, where: str) -> float:
    """Seconds from a PgBouncer time value ("600", "1.5", "250ms", "5min")."""
    match = _DURATION.match(value)
    if match is None:
        raise ConfigError(f"{where}: {key}: not a duration: {value!r}")
    return float(match[1]) * _UNITS[match[2] or "s"]


def parse_connstring(text: str, where: str) -> dict[str, str]:
    """libpq-style `key=value key='quoted value'` pairs, as PgBouncer's [databases] uses."""
    out: dict[str, str] = {}
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return out
        eq = text.find("=", pos)
        if eq < 0:
            raise ConfigError(f"{where}: expected key=value, got {text[pos:]!r}")
        key = text[pos:eq].strip().lower()
        if not key or any(ch.isspace() for ch in key):
            raise ConfigError(f"{where}: bad key in connection string near {text[pos:]!r}")
        pos = eq + 1
        while pos < end and text[pos] in " \t":
            pos += 1
        value: list[str] = []
        if pos < end and text[pos] == "'":
            pos += 1
            while True:
                if pos >= end:
                    raise ConfigError(f"{where}: {key}: unterminated quoted value")
                ch = text[pos]
                if ch == "\\" and pos + 1 < end:
                    value.append(text[pos + 1])
                    pos += 2
                elif ch == "'" and pos + 1 < end and text[pos + 1] == "'":
                    value.append("'")
                    pos += 2
                elif ch == "'":
                    pos += 1
                    break
                else:
                    value.append(ch)
                    pos += 1
        else:
            while pos < end and not text[pos].isspace():
                value.append(text[pos])
                pos += 1
        out[key] = "".join(value)


def _read_sections(text: str, source: str, seen: set[Path]) -> list[tuple[str, str, str, str]]:
    """(section, key, value, where) for every setting line, following %include."""
    out: list[tuple[str, str, str, str]] = []
    section = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{source}:{lineno}"
        if not line or line[0] in ";#":
            continue
        if line.startswith("%include"):
            target = Path(line[len("%include") :].strip())
            if not target.is_absolute():
                target = Path(source).parent / target
            target = target.resolve()
            if target in seen:
                raise ConfigError(f"{where}: %include loop through {target}")
            try:
                included = target.read_text()
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read included file {target}: {exc.strerror}") from None
            out.extend(_read_sections(included, str(target), seen | {target}))
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"{where}: malformed section header {line!r}")
            section = line[1:-1].strip().lower()
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise ConfigError(f"{where}: expected key = value, got {line!r}")
        key = key.strip()
        if section not in ("databases", "users"):
            key = key.lower()
        out.append((section, key, value.strip(), where))
    return out


def ini_to_dict(text: str, source: str = "<ini>") -> dict[str, Any]:
    """The config mapping a PgBouncer INI file stands for (validated later by the model)."""
    data: dict[str, Any] = {}
    databases: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    for section, key, value, where in _read_sections(text, source, set()):
        if section == "pgbouncer":
            _pgbouncer_setting(data, key, value, where)
        elif section == "databases":
            databases[_unquote_name(key)] = _database_entry(key, value, where)
        elif section == "users":
            users[_unquote_name(key)] = _user_entry(key, value, where)
        elif section in ("peers",):
            log.warning("%s: [peers] %s ignored: pgfleet has no peering", where, key)
        else:
            raise ConfigError(f"{where}: setting outside a known section ([{section or 'none'}])")
    if databases:
        data["databases"] = databases
    if users:
        data["users"] = users
    return data


def _unquote_name(name: str) -> str:
    # PgBouncer lets database and user names be double-quoted to keep odd characters.
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name


def _pgbouncer_setting(data: dict[str, Any], key: str, value: str, where: str) -> None:
    if key in IGNORED_PGBOUNCER_KEYS or (key.startswith(_IGNORED_PREFIXES) and key not in _SUPPORTED_PGBOUNCER_KEYS):
        log.warning("%s: %s ignored: pgfleet does not implement it", where, key)
        return
    if key not in _SUPPORTED_PGBOUNCER_KEYS:
        raise ConfigError(f"{where}: unknown setting {key!r}")
    if key in DURATION_KEYS:
        data[key] = parse_duration(value, key, where)
    elif key == "listen_addr":
        # PgBouncer listens on a comma list; pgfleet binds one address.
        addresses = [a.strip() for a in value.split(",") if a.strip()]
        if len(addresses) > 1:
            log.warning(
                "%s: listen_addr lists %d addresses; pgfleet listens on %s only", where, len(addresses), addresses[0]
            )
        data[key] = addresses[0] if addresses else "127.0.0.1"
    elif key == "unix_socket_dir":
        data[key] = value or None  # empty disables the socket, as in PgBouncer
    elif key == "auth_type":
        if value not in _SUPPORTED_AUTH_TYPES:
            raise ConfigError(
                f"{where}: auth_type {value!r} is not supported (use one of {', '.join(_SUPPORTED_AUTH_TYPES)})"
            )
        data[key] = value
    else:
        # Booleans (0/1, on/off, yes/no), integers and comma lists are left to the
        # model's own coercion, which names the key when a value does not fit.
        data[key] = value


def _database_entry(name: str, value: str, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for given, raw in parse_connstring(value, where).items():
        key = _DATABASE_ALIASES.get(given, given)
        if key in IGNORED_DATABASE_KEYS:
            log.warning("%s: [databases] %s: %s ignored: pgfleet does not implement it", where, name, key)
            continue
        if key not in _SUPPORTED_DATABASE_KEYS:
            raise ConfigError(f"{where}: [databases] {name}: unknown setting {key!r}")
        if key == "host" and "," in raw:
            first = raw.split(",")[0].strip()
            log.warning("%s: [databases] %s: several hosts given; pgfleet connects to %s only", where, name, first)
            entry[key] = first
        elif key in DURATION_KEYS:
            entry[key] = parse_duration(raw, key, f"{where}: [databases] {name}")
        else:
            entry[key] = raw
    return entry


def _user_entry(name: str, value: str, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key, raw in parse_connstring(value, where).items():
        if key in IGNORED_USER_KEYS:
            log.warning("%s: [users] %s: %s ignored: pgfleet does not implement it", where, name, key)
            continue
        if key not in _SUPPORTED_USER_KEYS:
            raise ConfigError(f"{where}: [users] {name}: unknown setting {key!r}")
        entry[key] = parse_duration(raw, key, f"{where}: [users] {name}") if key in DURATION_KEYS else raw
    return entry


def is_unimplemented(key: str) -> bool:
    """A [pgbouncer] setting PgBouncer has and pgfleet knows it does not act on."""
    return key not in _SUPPORTED_PGBOUNCER_KEYS and (key in IGNORED_PGBOUNCER_KEYS or key.startswith(_IGNORED_PREFIXES))
