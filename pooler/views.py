"""Read-only views of live pool state, shared by the admin console, /metrics and /status.

Everything here is computed when asked (a SHOW, a scrape, a GET) by walking the pools;
nothing is counted on the hot path for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .client import ClientState
from .config import DatabaseConfig

if TYPE_CHECKING:
    from .pool import Pool
    from .pooler import Pooler

ADMIN_DATABASE = "pgbouncer"


@dataclass(slots=True)
class PoolCounts:
    """A pool's connections in PgBouncer's SHOW POOLS terms."""

    cl_active: int  # logged in, linked to a server or idle with nothing queued
    cl_waiting: int  # sent a query, queued for a server
    sv_active: int  # linked to a client
    sv_idle: int
    sv_used: int  # PgBouncer's "idle past server_check_delay"; pgfleet has no such state
    sv_tested: int  # running the pool's own reset/rollback, not yet back in the pool
    sv_login: int
    maxwait: float  # seconds the oldest waiting client has waited


def pool_counts(pool: Pool, now: float) -> PoolCounts:
    active = waiting = 0
    for client in pool.clients.values():
        if client.state is ClientState.WAITING:
            waiting += 1
        elif client.state is not ClientState.CLOSED:
            active += 1
    maxwait = 0.0
    for client in pool.waiting:
        # The queue may still hold clients that left; they are skipped when served.
        if client.state is ClientState.WAITING:
            maxwait = max(0.0, now - client.wait_start)
            break
    linked = sum(1 for server in pool.active if server.client is not None)
    return PoolCounts(
        cl_active=active,
        cl_waiting=waiting,
        sv_active=linked,
        sv_idle=len(pool.idle),
        sv_used=0,
        sv_tested=len(pool.active) - linked,
        sv_login=pool.connecting,
        maxwait=maxwait,
    )


def sum_stats(pools: Iterable[Pool]) -> dict[str, int]:
    """PoolStats counters added up over some pools (a database, or all)."""
    total: dict[str, int] = {}
    for pool in pools:
        for key, value in pool.stats.as_dict().items():
            total[key] = total.get(key, 0) + value
    return total


def wall_clock(pooler: Pooler, loop_time: float) -> float:
    """Turn a loop.time() stamp into seconds since the epoch."""
    return time.time() - (pooler.loop.time() - loop_time)


def database_names(pooler: Pooler) -> list[str]:
    """Configured databases (not the `*` fallback) and those reached through it, in order."""
    names = [name for name in pooler.config.databases if name != "*"]
    seen = set(names)
    for database, _user in pooler.pools:
        if database not in seen:
            seen.add(database)
            names.append(database)
    return names


def database_config(pooler: Pooler, name: str) -> DatabaseConfig:
    return pooler.config.database(name) or DatabaseConfig()


def lists(pooler: Pooler) -> dict[str, int]:
    """SHOW LISTS, in its order; the admin database and its pool count, as in PgBouncer."""
    users = {user for _db, user in pooler.pools} | set(pooler.config.users)
    return {
        "databases": len(database_names(pooler)) + 1,
        "users": len(users),
        "peers": 0,
        "pools": len(pooler.pools) + 1,
        "peer_pools": 0,
        "free_clients": 0,
        "used_clients": len(pooler.clients),
        "login_clients": len(pooler.clients) - pooler.logged_in_clients,
        "free_servers": 0,
        "used_servers": sum(pool.server_count for pool in pooler.pools.values()),
        "dns_names": 0,
        "dns_zones": 0,
        "dns_queries": 0,
        "dns_pending": 0,
    }


def pools_of(pooler: Pooler, database: str | None) -> list[Pool]:
    """The pools of one database, or all of them."""
    return [pool for pool in pooler.pools.values() if database is None or pool.database == database]
