"""The HTTP control port: /metrics, /healthz, /readyz, /status, PUT /limits, PUT /pause, POST /drain.

Reads are open (bind the port to a private address); the writes need the bearer
token kept in `http_token_file`, compared in constant time. Without a token file the
writes are refused outright (403): a control port that anyone on the network could use
to drain the pooler or starve it of connections is worse than none.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import views
from .config import ConfigError
from .metrics import make_registry

log = logging.getLogger("pgfleet.http")

POOLER_KEY: web.AppKey[Any] = web.AppKey("pooler", object)

# What PUT /limits may change, in the config's own terms.
GLOBAL_LIMITS = frozenset(
    {
        "default_pool_size",
        "min_pool_size",
        "reserve_pool_size",
        "max_db_connections",
        "max_user_connections",
        "max_client_conn",
    }
)
DATABASE_LIMITS = frozenset({"pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections"})
USER_LIMITS = frozenset({"pool_size", "max_user_connections"})
MAX_BODY = 1 << 20


class BadRequest(Exception):
    """A PUT /limits body that cannot be applied; the message says why."""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=1, sort_keys=True) + "\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


# -- reading the pooler ----------------------------------------------------------------------------


def limits_in_force_config(config: Any, *, keep_unset: bool = False) -> dict[str, Any]:
    """The limit settings of `config`, overrides included, in PUT /limits' own terms.

    `keep_unset`: list an override that is not set as null, so that applying the result
    also drops an override set elsewhere (a restarted worker's file).
    """

    def overrides(entry: Any, keys: frozenset[str]) -> dict[str, Any]:
        values = {key: getattr(entry, key) for key in sorted(keys)}
        return values if keep_unset else {key: value for key, value in values.items() if value is not None}

    return {
        **{key: getattr(config, key) for key in sorted(GLOBAL_LIMITS)},
        "databases": {name: overrides(db, DATABASE_LIMITS) for name, db in config.databases.items()},
        "users": {name: overrides(user, USER_LIMITS) for name, user in config.users.items()},
    }


def limits_in_force(pooler: Any) -> dict[str, Any]:
    """The limits the pooler applies now: settings, overrides, and per-pool results."""
    return {
        **limits_in_force_config(pooler.config),
        "pools": [
            {"database": pool.database, "user": pool.user, **pool_limits(pool)} for pool in pooler.pools.values()
        ],
    }


def pool_limits(pool: Any) -> dict[str, int]:
    """The limits in force for one pool, in the config's terms."""
    return {
        "pool_size": pool.pool_size,
        "min_pool_size": pool.min_pool_size,
        "reserve_pool_size": pool.reserve_pool_size,
        "max_db_connections": pool.max_db_connections,
        "max_user_connections": pool.max_user_connections,
        "limit": pool.limit,
    }


# The counts /status sums over the pools (and a multi-worker pooler over its workers).
STATUS_COUNTS = ("clients_active", "clients_waiting", "servers_active", "servers_idle", "servers_used", "servers_login")


def backend_pids(pool: Any) -> list[int]:
    """PIDs of the PostgreSQL backends the pool holds (from BackendKeyData), logins not done excluded."""
    return sorted(server.backend_pid for server in (*pool.idle, *pool.active) if server.backend_pid)


def status(pooler: Any) -> dict[str, Any]:
    now = pooler.loop.time()
    pools = []
    totals = dict.fromkeys(STATUS_COUNTS, 0)
    maxwait = 0.0
    pids: list[int] = []
    for pool in pooler.pools.values():
        counts = views.pool_counts(pool, now)
        pool_pids = backend_pids(pool)
        pids.extend(pool_pids)
        maxwait = max(maxwait, counts.maxwait)
        pools.append(
            {
                "database": pool.database,
                "user": pool.user,
                "mode": pool.mode.value,
                "paused": pool.paused,
                "clients": {"active": counts.cl_active, "waiting": counts.cl_waiting},
                "servers": {
                    "active": counts.sv_active + counts.sv_tested,
                    "idle": counts.sv_idle,
                    "used": counts.sv_used,
                    "login": counts.sv_login,
                },
                "maxwait_seconds": round(counts.maxwait, 6),
                "backend_pids": pool_pids,
                "full_refusals": pool.full_refusals,
                "limits": pool_limits(pool),
                "totals": pool.stats.as_dict(),
            }
        )
        totals["clients_active"] += counts.cl_active
        totals["clients_waiting"] += counts.cl_waiting
        totals["servers_active"] += counts.sv_active + counts.sv_tested
        totals["servers_idle"] += counts.sv_idle
        totals["servers_used"] += counts.sv_used
        totals["servers_login"] += counts.sv_login
    return {
        "ready": not pooler.draining,
        "draining": pooler.draining,
        # The whole pooler's PAUSE (PUT /pause, the console's PAUSE); "servers" says how far it got.
        "paused": bool(pooler.admin is not None and pooler.admin.paused_all),
        "uptime_seconds": round(now - pooler.started_at, 3),
        "clients": len(pooler.clients),
        "servers": sum(pool.server_count for pool in pooler.pools.values()),
        # The operator tells the fleet's backends from others' on the server by these PIDs.
        "backend_pids": sorted(pids),
        "maxwait_seconds": round(maxwait, 6),
        "limits": limits_in_force_config(pooler.config),
        "totals": totals,
        "pools": pools,
    }


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


def parse_limits(body: bytes) -> dict[str, Any]:
    """Check a PUT /limits body; unknown keys and wrong types are errors, never ignored."""
    data = _load_json(body)
    if not isinstance(data, dict) or not data:
        raise BadRequest("body must be a non-empty JSON object of limits")
    for key, value in data.items():
        if key in ("databases", "users"):
            allowed = DATABASE_LIMITS if key == "databases" else USER_LIMITS
            if not isinstance(value, dict):
                raise BadRequest(f"{key}: expected an object keyed by {key[:-1]} name")
            for name, entry in value.items():
                if not isinstance(entry, dict):
                    raise BadRequest(f"{key}.{name}: expected an object of limits")
                for sub, number in entry.items():
                    if sub not in allowed:
                        raise BadRequest(
                            f"{key}.{name}.{sub}: not a limit PUT /limits can change ({', '.join(sorted(allowed))})"
                        )
                    _check_count(f"{key}.{name}.{sub}", number, nullable=True)
        elif key in GLOBAL_LIMITS:
            _check_count(key, value, nullable=False)
        else:
            raise BadRequest(
                f"{key}: not a limit PUT /limits can change ({', '.join(sorted(GLOBAL_LIMITS))}, databases, users)"
            )
    return data


def _check_count(where: str, value: Any, *, nullable: bool) -> None:
    if value is None and nullable:
        return  # drop the override: the global setting applies again
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(
            f"{where}: expected a non-negative integer{' or null' if nullable else ''}, got {json.dumps(value)}"
        )


def parse_pause(body: bytes) -> bool:
    """Check a PUT /pause body: {"paused": true} or {"paused": false}, nothing else."""
    data = _load_json(body)
    if not isinstance(data, dict) or set(data) != {"paused"} or not isinstance(data["paused"], bool):
        raise BadRequest('body must be {"paused": true} or {"paused": false}')
    return bool(data["paused"])


# -- handlers ------------------------------------------------------------------------------------------


def authorize(request: web.Request) -> web.Response | None:
    """None if the request carries the token; else the response that refuses it."""
    if request.app[INTERNAL_KEY]:
        return None  # a worker's private socket: only the supervisor, which checked the token, reaches it
    pooler = request.app[POOLER_KEY]
    token_file = pooler.config.http_token_file
    if not token_file:
        return error_response(403, "this endpoint is disabled: set http_token_file in the pooler config to enable it")
    try:
        expected = Path(token_file).read_text().strip()
    except OSError as exc:
        log.error("cannot read http_token_file %s: %s", token_file, exc.strerror)
        return error_response(503, "the token file cannot be read; see the pooler log")
    if not expected:
        return error_response(503, "the token file is empty; refusing every request")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return error_response(401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="pgfleet"'})
    return None


async def handle_metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    if request.app[POOLER_KEY].draining:
        return json_response({"ready": False, "reason": "draining"}, 503)
    return json_response({"ready": True})


async def handle_status(request: web.Request) -> web.Response:
    return json_response(status(request.app[POOLER_KEY]))


async def read_limits(request: web.Request) -> dict[str, Any] | web.Response:
    """The checked body of a PUT /limits, or the response that refuses the request."""
    refused = authorize(request)
    if refused is not None:
        return refused
    try:
        body = await request.read()  # the whole body; larger than client_max_size raises
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"body too large (at most {MAX_BODY} bytes)")
    try:
        return parse_limits(body)
    except BadRequest as exc:
        return error_response(400, str(exc))


async def read_pause(request: web.Request) -> bool | web.Response:
    """The checked body of a PUT /pause, or the response that refuses the request."""
    refused = authorize(request)
    if refused is not None:
        return refused
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"body too large (at most {MAX_BODY} bytes)")
    try:
        return parse_pause(body)
    except BadRequest as exc:
        return error_response(400, str(exc))


def pause_state(pooler: Any) -> dict[str, Any]:
    """PUT /pause's answer: paused or not, and the server connections still open (0: fully paused)."""
    console = pooler.admin
    return {"paused": bool(console.paused_all), "servers": console.servers_open()}


async def handle_put_pause(request: web.Request) -> web.Response:
    """PAUSE (transactions in flight finish, new ones queue, servers close) or RESUME, idempotently.

    It answers at once: "servers" counts what is still open, and reaches 0 once every
    transaction in flight has ended. Its RESUME lifts only a pause it made itself.
    """
    wanted = await read_pause(request)
    if isinstance(wanted, web.Response):
        return wanted
    pooler = request.app[POOLER_KEY]
    console = pooler.admin
    if console is None:
        return error_response(501, "this pooler has no admin console to pause with")
    if wanted and not console.paused_all:
        log.info("PUT /pause from %s: PAUSE", request.remote)
        console.pause_all()
        console.paused_by_control = True
    elif not wanted and console.paused_by_control:
        if pooler.draining:
            return error_response(409, "the pooler is shutting down; it stays paused")
        log.info("PUT /pause from %s: RESUME", request.remote)
        console.resume_all()
    return json_response(pause_state(pooler))


async def handle_put_limits(request: web.Request) -> web.Response:
    changes = await read_limits(request)
    if isinstance(changes, web.Response):
        return changes
    pooler = request.app[POOLER_KEY]
    try:
        pooler.set_limits(changes)
    except ConfigError as exc:
        return error_response(400, str(exc))
    log.info("PUT /limits from %s: %s", request.remote, json.dumps(changes, sort_keys=True))
    return json_response(limits_in_force(pooler))


async def handle_drain(request: web.Request) -> web.Response:
    refused = authorize(request)
    if refused is not None:
        return refused
    pooler = request.app[POOLER_KEY]
    log.info("POST /drain from %s", request.remote)
    pooler.drain()
    return json_response({"draining": True, "clients": len(pooler.clients)}, 202)


REGISTRY_KEY: web.AppKey[Any] = web.AppKey("registry", object)
INTERNAL_KEY: web.AppKey[bool] = web.AppKey("internal", bool)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def new_app(
    owner: Any,
    *,
    metrics: Handler,
    healthz: Handler,
    readyz: Handler,
    status: Handler,
    put_limits: Handler,
    put_pause: Handler,
    drain: Handler,
    internal: bool = False,
) -> web.Application:
    """The control port's routes, served for `owner`: a pooler, or the supervisor of workers."""
    app = web.Application(client_max_size=MAX_BODY)
    app[POOLER_KEY] = owner
    app[INTERNAL_KEY] = internal
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_put("/limits", put_limits)
    app.router.add_put("/pause", put_pause)
    app.router.add_post("/drain", drain)
    return app


def build_app(pooler: Any, *, internal: bool = False) -> web.Application:
    app = new_app(
        pooler,
        metrics=handle_metrics,
        healthz=handle_healthz,
        readyz=handle_readyz,
        status=handle_status,
        put_limits=handle_put_limits,
        put_pause=handle_put_pause,
        drain=handle_drain,
        internal=internal,
    )
    app[REGISTRY_KEY] = make_registry(pooler)
    return app


async def start_http(pooler: Any, host: str | None = None, port: int | None = None) -> web.AppRunner:
    """Serve the control port; the caller owns the runner (`await runner.cleanup()`)."""
    runner = web.AppRunner(build_app(pooler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or pooler.config.http_listen_addr, port or pooler.config.http_listen_port)
    await site.start()
    if not pooler.config.http_token_file:
        log.warning("http_token_file is not set: PUT /limits, PUT /pause and POST /drain are refused (403)")
    log.info("HTTP control port on %s", ", ".join(str(address) for address in runner.addresses))
    return runner


async def start_worker_http(pooler: Any) -> web.AppRunner:
    """A worker's control port on its private socket, for the supervisor to front."""
    runner = web.AppRunner(build_app(pooler, internal=True), access_log=None)
    await runner.setup()
    path = pooler.slot.http_socket
    path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(path)).start()
    return runner


async def _startup_hook(pooler: Any) -> None:
    if not pooler.slot.single:
        runner = await start_worker_http(pooler)
    elif pooler.config.http_listen_port:
        runner = await start_http(pooler)
    else:
        return

    async def close_when_stopped() -> None:
        await pooler.wait_stopped()
        await runner.cleanup()

    task = pooler.loop.create_task(close_when_stopped())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[Any] = set()


def _register() -> None:
    from .cli import STARTUP_HOOKS

    if _startup_hook not in STARTUP_HOOKS:
        STARTUP_HOOKS.append(_startup_hook)


_register()
