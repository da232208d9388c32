"""The pooler's configuration: one pydantic model, the schema of the config file.

Setting names and meanings are PgBouncer's wherever PgBouncer has the setting, so that
a PgBouncer user can read a pgfleet config without a dictionary. Durations are seconds
(floats allowed). The operator renders exactly this model into the pooler's ConfigMap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("pgfleet.config")

Port = Annotated[int, Field(ge=1, le=65535)]
# Every number has a ceiling, so that a typo (or PUT /limits, or SET) cannot ask for 2**63
# server connections or a timer 1e30 s away: PostgreSQL's and PgBouncer's int, ten years.
MAX_COUNT = 2**31 - 1
MAX_SECONDS = 10 * 365 * 24 * 3600
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class PoolMode(str, Enum):
    SESSION = "session"
    TRANSACTION = "transaction"
    STATEMENT = "statement"


class AuthType(str, Enum):
    TRUST = "trust"
    ANY = "any"
    PLAIN = "plain"
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"
    HBA = "hba"  # per connection, from auth_hba_file


class SslMode(str, Enum):
    """PgBouncer's client_tls_sslmode / server_tls_sslmode values (libpq's sslmode names)."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"

    @property
    def demands_tls(self) -> bool:
        return self in (SslMode.REQUIRE, SslMode.VERIFY_CA, SslMode.VERIFY_FULL)

    @property
    def verifies(self) -> bool:
        return self in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL)


class _Strict(BaseModel):
    # A misspelt key is an error that names it, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


class DatabaseConfig(_Strict):
    """One entry of `databases:`: where a client-visible database name leads."""

    host: str = "127.0.0.1"
    port: Port = 5432
    dbname: str | None = Field(default=None, description="Server database name; defaults to the client-visible name.")
    user: str | None = Field(default=None, description="Log in to the server as this user instead of the client's.")
    password: str | None = Field(default=None, description="Password for `user`; else taken from auth_file.")
    pool_size: Count | None = Field(default=None, description="Overrides default_pool_size for this database.")
    min_pool_size: Count | None = None
    reserve_pool_size: Count | None = None
    pool_mode: PoolMode | None = None
    max_db_connections: Count | None = Field(default=None, description="Overrides max_db_connections.")
    max_db_client_connections: Count | None = Field(default=None, description="Overrides max_db_client_connections.")
    connect_query: str | None = Field(default=None, description="SQL run once on every new server connection.")
    server_lifetime: Seconds | None = Field(default=None, description="Overrides server_lifetime for this database.")
    # Client time limits for this database's clients (a user's own setting wins).
    query_timeout: Seconds | None = None
    idle_transaction_timeout: Seconds | None = None
    client_idle_timeout: Seconds | None = None
    transaction_timeout: Seconds | None = None

    @property
    def unix_socket(self) -> str | None:
        """The server's socket path when `host` is a directory (starts with `/`), as libpq reads it."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


class UserConfig(_Strict):
    """One entry of `users:` (PgBouncer's [users] section)."""

    pool_mode: PoolMode | None = None
    max_user_connections: Count | None = None
    pool_size: Count | None = None
    reserve_pool_size: Count | None = None
    max_user_client_connections: Count | None = None
    # Client time limits for this user's clients (over the database's and the global ones).
    query_timeout: Seconds | None = None
    idle_transaction_timeout: Seconds | None = None
    client_idle_timeout: Seconds | None = None
    transaction_timeout: Seconds | None = None


def _split_list(value: Any) -> Any:
    # PgBouncer writes lists as comma-separated strings; YAML users write lists.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class PoolerConfig(_Strict):
    """Schema of the pooler config file (YAML, or PgBouncer INI)."""

    # Where clients connect.
    listen_addr: str = Field(default="127.0.0.1", description="Address to listen on; `*` or 0.0.0.0 for all.")
    listen_port: Port = 6432
    unix_socket_dir: str | None = Field(default=None, description="Also listen on .s.PGSQL.<port> in this directory.")
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="Pooler processes sharing listen_port (SO_REUSEPORT); every pool limit is split among them.",
    )

    # How clients authenticate.
    auth_type: AuthType = AuthType.MD5
    auth_file: str | None = Field(default=None, description='PgBouncer userlist: lines of "user" "secret".')
    auth_user: str | None = Field(
        default=None, description="Look users missing from auth_file up with auth_query, logged in as this user."
    )
    auth_query: str = Field(
        default="SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        description="Query returning (name, secret) for $1, the user name.",
    )
    auth_dbname: str | None = Field(
        default=None, description="Database (a `databases` entry) auth_query runs in; default the client's."
    )
    auth_hba_file: str | None = Field(
        default=None, description="auth_type hba: pg_hba.conf-style rules choosing the method per connection."
    )
    admin_users: list[str] = Field(default_factory=list)
    stats_users: list[str] = Field(default_factory=list)

    # TLS towards clients (PgBouncer's names; files are read at start and at every reload).
    client_tls_sslmode: SslMode = Field(
        default=SslMode.DISABLE, description="disable, allow, prefer, require, verify-ca, verify-full."
    )
    client_tls_key_file: str | None = Field(default=None, description="Private key the pooler shows clients.")
    client_tls_cert_file: str | None = Field(default=None, description="Certificate the pooler shows clients.")
    client_tls_ca_file: str | None = Field(default=None, description="CA that client certificates must chain to.")
    client_tls_protocols: str = Field(default="secure", description="secure (TLS 1.2 and 1.3), all, or tlsv1.x list.")
    client_tls_ciphers: str = Field(default="default", description="OpenSSL cipher list; default keeps Python's.")
    # TLS towards PostgreSQL.
    server_tls_sslmode: SslMode = Field(
        default=SslMode.PREFER, description="disable, allow, prefer, require, verify-ca, verify-full."
    )
    server_tls_ca_file: str | None = Field(default=None, description="CA the server certificate must chain to.")
    server_tls_key_file: str | None = Field(default=None, description="Client certificate key shown to PostgreSQL.")
    server_tls_cert_file: str | None = Field(default=None, description="Client certificate shown to PostgreSQL.")
    server_tls_protocols: str = Field(default="secure", description="secure (TLS 1.2 and 1.3), all, or tlsv1.x list.")
    server_tls_ciphers: str = Field(default="default", description="OpenSSL cipher list; default keeps Python's.")

    # Pooling.
    pool_mode: PoolMode = PoolMode.TRANSACTION
    max_client_conn: Count = 100
    default_pool_size: Count = 20
    min_pool_size: Count = 0
    reserve_pool_size: Count = 0
    reserve_pool_timeout: Seconds = 5.0
    max_db_connections: Count = Field(default=0, description="0 means unlimited.")
    max_user_connections: Count = Field(default=0, description="0 means unlimited.")
    max_db_client_connections: Count = Field(default=0, description="Clients per database; 0 means unlimited.")
    max_user_client_connections: Count = Field(default=0, description="Clients per user; 0 means unlimited.")
    max_prepared_statements: Count = Field(
        default=200, description="Server-side prepared statements kept per server connection; 0 disables tracking."
    )

    # Server connection life cycle.
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_idle_timeout: Seconds = 600.0
    server_lifetime: Seconds = 3600.0
    server_connect_timeout: Seconds = 15.0
    server_login_retry: Seconds = 15.0
    server_check_query: str = Field(
        default="",
        description="Run on a server idle longer than server_check_delay before a client gets it ('': an empty query).",
    )
    server_check_delay: Seconds = Field(default=30.0, description="0: check before every use.")
    server_fast_close: bool = Field(
        default=False,
        description="Session mode: close a session whose server is marked to close at its transaction's end.",
    )

    # Client time limits (0 disables).
    query_wait_timeout: Seconds = 120.0
    query_wait_notify: Seconds = Field(
        default=5.0, description="A NOTICE tells a client queued this long that it waits for a server; 0: never."
    )
    query_timeout: Seconds = 0.0
    client_idle_timeout: Seconds = 0.0
    client_login_timeout: Seconds = 60.0
    idle_transaction_timeout: Seconds = 0.0
    transaction_timeout: Seconds = Field(default=0.0, description="Longest a client may stay in one transaction.")
    shutdown_timeout: Seconds = Field(default=30.0, description="Longest a SIGTERM drain waits for clients.")

    ignore_startup_parameters: list[str] = Field(default_factory=list)

    # Control surface.
    http_listen_addr: str = "127.0.0.1"
    http_listen_port: Annotated[int, Field(ge=0, le=65535)] = Field(default=0, description="0 disables the HTTP port.")
    http_token_file: str | None = Field(default=None, description="Bearer token for PUT /limits and POST /drain.")
    stats_period: Annotated[float, Field(gt=0)] = 60.0
    start_paused: bool = Field(
        default=False,
        description="Start PAUSEd, before the first client: as a PUT /pause that came first (its RESUME lifts it). "
        "Read at start only.",
    )

    # Logging.
    log_connections: bool = True
    log_disconnections: bool = True
    log_pooler_errors: bool = True
    verbose: Annotated[int, Field(ge=0, le=3)] = 0

    databases: dict[str, DatabaseConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)

    _split = field_validator("admin_users", "stats_users", "ignore_startup_parameters", mode="before")(
        lambda cls, v: _split_list(v)
    )

    @model_validator(mode="after")
    def _check(self) -> PoolerConfig:
        if self.auth_type is AuthType.HBA and not self.auth_hba_file:
            raise ValueError("auth_type hba needs auth_hba_file")
        if self.auth_type not in (AuthType.TRUST, AuthType.ANY, AuthType.HBA) and not (
            self.auth_file or self.auth_user
        ):
            raise ValueError(f"auth_type {self.auth_type.value} needs auth_file or auth_user")
        self._check_tls()
        if self.min_pool_size > self.default_pool_size:
            raise ValueError("min_pool_size must not exceed default_pool_size")
        if self.workers > 1:
            for key, value in self._split_limits():
                if 0 < value < self.workers:
                    raise ValueError(
                        f"{key} is {value}, below workers ({self.workers}): "
                        "every worker needs at least one of each limit it is given a share of"
                    )
        return self

    def _check_tls(self) -> None:
        # What a mode needs that the config must name; whether the files can be read is
        # checked where they are loaded (tls.build_contexts), at start and at every reload.
        if self.client_tls_sslmode is not SslMode.DISABLE:
            for key in ("client_tls_key_file", "client_tls_cert_file"):
                if not getattr(self, key):
                    raise ValueError(f"client_tls_sslmode {self.client_tls_sslmode.value} needs {key}")
        if self.client_tls_sslmode.verifies and not self.client_tls_ca_file:
            raise ValueError(f"client_tls_sslmode {self.client_tls_sslmode.value} needs client_tls_ca_file")
        if bool(self.server_tls_key_file) != bool(self.server_tls_cert_file):
            raise ValueError("server_tls_key_file and server_tls_cert_file go together")

    def _split_limits(self) -> list[tuple[str, int]]:
        """The limits `workers` divides, by name; 0 means unlimited (or none) and is not divided."""
        limits = [
            ("max_client_conn", self.max_client_conn),
            ("default_pool_size", self.default_pool_size),
            ("max_db_connections", self.max_db_connections),
            ("max_user_connections", self.max_user_connections),
            ("max_db_client_connections", self.max_db_client_connections),
            ("max_user_client_connections", self.max_user_client_connections),
        ]
        for name, db in self.databases.items():
            limits += [(f"databases.{name}.pool_size", db.pool_size or 0)]
            limits += [(f"databases.{name}.max_db_connections", db.max_db_connections or 0)]
            limits += [(f"databases.{name}.max_db_client_connections", db.max_db_client_connections or 0)]
        for name, user in self.users.items():
            limits += [(f"users.{name}.pool_size", user.pool_size or 0)]
            limits += [(f"users.{name}.max_user_connections", user.max_user_connections or 0)]
            limits += [(f"users.{name}.max_user_client_connections", user.max_user_client_connections or 0)]
        return limits

    def database(self, name: str) -> DatabaseConfig | None:
        """The entry for a client-visible database name, falling back to `*`."""
        return self.databases.get(name) or self.databases.get("*")

    def limits_for(self, database: str, user: str | None = None) -> PoolLimits:
        """The limits of the (database, user) pool: a user's override wins, then the
        database's, then the global setting."""
        db = self.database(database) or DatabaseConfig()
        entry = self.users.get(user) if user is not None else None
        size = self.default_pool_size
        if db.pool_size is not None:
            size = db.pool_size
        if entry is not None and entry.pool_size is not None:
            size = entry.pool_size
        reserve = db.reserve_pool_size if db.reserve_pool_size is not None else self.reserve_pool_size
        if entry is not None and entry.reserve_pool_size is not None:
            reserve = entry.reserve_pool_size
        return PoolLimits(
            pool_size=size,
            min_pool_size=min(db.min_pool_size if db.min_pool_size is not None else self.min_pool_size, size),
            reserve_pool_size=reserve,
            max_db_connections=db.max_db_connections if db.max_db_connections is not None else self.max_db_connections,
            max_user_connections=(
                entry.max_user_connections
                if entry is not None and entry.max_user_connections is not None
                else self.max_user_connections
            ),
        )

    def client_limits_for(self, database: str, user: str) -> tuple[int, int]:
        """(max_db_client_connections, max_user_client_connections) for a client; 0: unlimited."""
        # Read at every login: no default entry is built for an unlisted user or database.
        db = self.database(database)
        entry = self.users.get(user)
        per_db = db.max_db_client_connections if db is not None else None
        per_user = entry.max_user_client_connections if entry is not None else None
        return (
            per_db if per_db is not None else self.max_db_client_connections,
            per_user if per_user is not None else self.max_user_client_connections,
        )

    def timeouts_for(self, database: str, user: str) -> ClientTimeouts:
        """The client time limits of a (database, user) pool: the user's, else the database's, else global."""
        db = self.database(database) or DatabaseConfig()
        entry = self.users.get(user) or UserConfig()

        def pick(key: str) -> float:
            for source in (entry, db):
                value = getattr(source, key)
                if value is not None:
                    return float(value)
            return float(getattr(self, key))

        return ClientTimeouts(*(pick(key) for key in TIMEOUT_KEYS))

    def has_client_timeouts(self) -> bool:
        """Whether any client time limit is set anywhere (else the janitor skips the clients)."""
        entries: list[Any] = [self, *self.databases.values(), *self.users.values()]
        return any(getattr(entry, key) for entry in entries for key in TIMEOUT_KEYS)


# The client time limits a user or database entry may set for itself (ClientTimeouts' fields).
TIMEOUT_KEYS = ("query_timeout", "idle_transaction_timeout", "client_idle_timeout", "transaction_timeout")


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """The time limits on one pool's clients, in seconds (0: none)."""

    query_timeout: float
    idle_transaction_timeout: float
    client_idle_timeout: float
    transaction_timeout: float


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """What one pool may open, in the config's terms (0: unlimited, for the two caps)."""

    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    max_user_connections: int

    def portioned(self, portion: Callable[[int], int]) -> PoolLimits:
        """One worker's share of each limit (shares.WorkerSlot.portion)."""
        size = portion(self.pool_size)
        return PoolLimits(
            pool_size=size,
            min_pool_size=min(portion(self.min_pool_size), size),
            reserve_pool_size=portion(self.reserve_pool_size),
            max_db_connections=portion(self.max_db_connections),
            max_user_connections=portion(self.max_user_connections),
        )


TLS_FILE_KEYS = (
    "client_tls_key_file",
    "client_tls_cert_file",
    "client_tls_ca_file",
    "server_tls_key_file",
    "server_tls_cert_file",
    "server_tls_ca_file",
)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the bad key."""


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> PoolerConfig:
    try:
        return PoolerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def merge_limits(config: PoolerConfig, changes: dict[str, Any]) -> PoolerConfig:
    """`config` with `changes` (config terms, databases/users merged per entry), validated."""
    data = config.model_dump(mode="json")
    for key, value in changes.items():
        if key == "databases" and isinstance(value, dict):
            for name, entry in value.items():
                if name not in data["databases"]:
                    raise ConfigError(f"databases.{name}: no such database")
                if not isinstance(entry, dict):
                    raise ConfigError(f"databases.{name}: expected a mapping")
                data["databases"][name].update(entry)
        elif key == "users" and isinstance(value, dict):
            for name, entry in value.items():
                if not isinstance(entry, dict):
                    raise ConfigError(f"users.{name}: expected a mapping")
                data["users"].setdefault(name, {}).update(entry)
        else:
            data[key] = value
    return parse_config(data, "limits")


def read_config_text(path: str | Path) -> str:
    """The text of a config file; ConfigError if it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_config(path: str | Path, *, workers: int | None = None, text: str | None = None) -> PoolerConfig:
    """Read a YAML config file (or a PgBouncer INI file, by its extension).

    `workers`: the number of worker processes running now. The limits must suit them, not
    a count the file sets for the next start, so the file is checked (and read) as if it
    said that. `text`: the file's text, read already (read_config_text).
    """
    path = Path(path)
    if text is None:
        text = read_config_text(path)
    if path.suffix == ".ini":
        from .ini import ini_to_dict  # PgBouncer drop-in; kept apart from the YAML path

        data = ini_to_dict(text, str(path))
    else:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    if workers is not None:
        if str(data.get("workers", 1)) != str(workers):
            log.warning("%s: workers changed (%d running): takes effect after a restart", path, workers)
        data = {**data, "workers": workers}
    config = parse_config(data, str(path))
    # Relative to the config file, as PgBouncer resolves its include paths.
    relative = {
        key: str(path.parent / value)
        for key in ("auth_file", "auth_hba_file", *TLS_FILE_KEYS)
        if (value := getattr(config, key)) and not Path(value).is_absolute()
    }
    return config.model_copy(update=relative) if relative else config


def dump_config(config: PoolerConfig) -> str:
    """YAML text of a config, omitting defaults (what the operator writes)."""
    data = config.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=True)
