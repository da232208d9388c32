"""Splitting a pooler into workers, as data: limit shares, cancel-key owners, merged views.

The worker processes themselves are tested in test_workers.py; here are the rules they
follow, which must hold for every combination, not just the ones a process test hits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pgfleet.pooler.config import ConfigError, load_config, parse_config
from pgfleet.pooler.http_front import label_families, merge_status
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.shares import WorkerSlot, share
from prometheus_client.parser import text_string_to_metric_families


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_shares_add_up_to_the_limit_and_differ_by_at_most_one(count: int) -> None:
    for limit in range(count, 200):
        parts = [share(limit, index, count) for index in range(count)]
        assert sum(parts) == limit
        assert max(parts) - min(parts) <= 1
        assert min(parts) >= 1


def test_zero_means_unlimited_and_is_not_split() -> None:
    assert [share(0, index, 3) for index in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("count", [1, 2, 5, 64])
def test_cancel_keys_name_their_worker(count: int) -> None:
    for index in range(count):
        slot = WorkerSlot(index, count)
        keys = [slot.new_cancel_key() for _ in range(200)]
        for pid, secret in keys:
            assert 0 < pid < 2**31
            assert slot.owner_of(pid) == index
            assert -(2**31) <= secret < 2**31
        assert len({secret for _, secret in keys}) > 190  # random, not a counter or a constant


def test_a_forked_worker_draws_other_cancel_keys_than_its_parent() -> None:
    """Cancel keys come from random bytes drawn ahead in batches: a worker forked after
    its parent drew some must not hand out the rest of the parent's batch."""
    slot = WorkerSlot()
    slot.new_cancel_key()  # the parent holds a batch now
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            keys = [slot.new_cancel_key() for _ in range(20)]
            os.write(write_end, json.dumps(keys).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_keys = {tuple(key) for key in json.loads(pipe.read())}
    os.waitpid(child, 0)
    parent_keys = {slot.new_cancel_key() for _ in range(20)}
    assert len(child_keys) == 20 and not child_keys & parent_keys


def test_worker_argument_is_checked() -> None:
    assert WorkerSlot.parse("1/3", "/tmp/x").index == 1
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        WorkerSlot.parse("one", None)
    with pytest.raises(ValueError, match="out of range"):
        WorkerSlot.parse("3/3", None)


def _config(**settings: object) -> dict[str, object]:
    return {"auth_type": "trust", "databases": {"app": {}}, **settings}


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"default_pool_size": 1}, "default_pool_size"),
        ({"max_client_conn": 2}, "max_client_conn"),
        ({"max_db_connections": 2}, "max_db_connections"),
        ({"databases": {"app": {"pool_size": 3}}}, "databases.app.pool_size"),
        ({"users": {"bob": {"max_user_connections": 1}}}, "users.bob.max_user_connections"),
    ],
)
def test_a_limit_below_the_worker_count_is_refused_by_name(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} is \d+, below workers \(4\)"):
        parse_config(_config(workers=4, **settings))


def test_unlimited_and_zero_limits_are_fine_with_workers() -> None:
    config = parse_config(_config(workers=4, max_db_connections=0, min_pool_size=0, reserve_pool_size=1))
    assert config.workers == 4
    with pytest.raises(ConfigError, match="workers"):
        parse_config(_config(workers=65))


async def test_each_worker_applies_its_share_of_the_pool_limits() -> None:
    config = parse_config(
        _config(workers=2, default_pool_size=5, min_pool_size=3, reserve_pool_size=1, max_db_connections=7)
    )
    sizes = []
    for index in range(2):
        pool = Pooler(config, slot=WorkerSlot(index, 2)).get_pool("app", "postgres")
        sizes.append((pool.pool_size, pool.min_pool_size, pool.reserve_pool_size, pool.max_db_connections))
    assert sizes == [(3, 2, 1, 4), (2, 1, 0, 3)]
    single = Pooler(config).get_pool("app", "postgres")
    assert (single.pool_size, single.max_db_connections) == (5, 7)


def _status(active: int, servers: int, xacts: int, pool_size: int, maxwait: float) -> dict[str, object]:
    counts = {"clients_active": active, "clients_waiting": 0, "servers_active": servers, "servers_idle": 0, "servers_used": 0, "servers_login": 0}  # fmt: skip
    pids = [1000 * pool_size + i for i in range(servers)]
    return {
        "clients": active,
        "servers": servers,
        "backend_pids": pids,
        "maxwait_seconds": maxwait,
        "totals": counts,
        "pools": [
            {
                "database": "app",
                "user": "alice",
                "mode": "transaction",
                "paused": False,
                "clients": {"active": active, "waiting": 0},
                "servers": {"active": servers, "idle": 0, "used": 0, "login": 0},
                "maxwait_seconds": maxwait,
                "backend_pids": pids,
                "limits": {"pool_size": pool_size, "limit": pool_size},
                "totals": {"xact_count": xacts},
            }
        ],
    }


def test_status_of_the_workers_sums_per_pool() -> None:
    merged = merge_status([_status(2, 1, 10, 3, 0.5), _status(3, 2, 5, 2, 0.1)])
    assert merged["clients"] == 5
    assert merged["servers"] == 3
    assert merged["totals"]["clients_active"] == 5
    (pool,) = merged["pools"]
    assert pool["clients"] == {"active": 5, "waiting": 0}
    assert pool["limits"] == {"pool_size": 5, "limit": 5}
    assert pool["totals"] == {"xact_count": 15}
    assert pool["maxwait_seconds"] == 0.5
    # Every worker's backends, so the operator can tell the pod's from others' on the server.
    assert merged["backend_pids"] == pool["backend_pids"] == [2000, 2001, 3000]
    assert merged["maxwait_seconds"] == 0.5


def test_metrics_of_the_workers_carry_a_worker_label() -> None:
    from pgfleet.pooler.http_front import FamiliesCollector
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    text = (
        "# HELP pgbouncer_pools_client_active_connections Client connections linked to a server\n"
        "# TYPE pgbouncer_pools_client_active_connections gauge\n"
        'pgbouncer_pools_client_active_connections{database="app",user="alice"} N\n'
        "# HELP pgbouncer_stats_queries_pooled_total Queries pooled\n"
        "# TYPE pgbouncer_stats_queries_pooled_total counter\n"
        'pgbouncer_stats_queries_pooled_total{database="app"} N\n'
    )
    families = label_families([(0, text.replace("N", "2")), (1, text.replace("N", "3"))])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(families))
    exposed = generate_latest(registry).decode()
    samples = {
        (sample.name, sample.labels["worker"]): sample.value
        for family in text_string_to_metric_families(exposed)
        for sample in family.samples
    }
    assert samples == {
        ("pgbouncer_pools_client_active_connections", "0"): 2.0,
        ("pgbouncer_pools_client_active_connections", "1"): 3.0,
        ("pgbouncer_stats_queries_pooled_total", "0"): 2.0,
        ("pgbouncer_stats_queries_pooled_total", "1"): 3.0,
    }
    assert exposed.count("# TYPE pgbouncer_stats_queries_pooled_total counter") == 1


async def test_every_view_of_a_worker_reads_the_limits_it_enforces() -> None:
    """SHOW DATABASES/USERS and /metrics call limits_for, as Pool.configure does."""
    config = parse_config(
        _config(
            workers=2,
            min_pool_size=3,
            reserve_pool_size=4,
            max_user_connections=10,
            users={"bob": {"pool_size": 4}},
        )
    )
    pooler = Pooler(config, slot=WorkerSlot(0, 2))
    pool = pooler.get_pool("app", "bob")
    limits = pooler.limits_for("app", "bob")
    assert limits.pool_size == pool.pool_size == 2
    assert (limits.min_pool_size, limits.reserve_pool_size, limits.max_user_connections) == (2, 2, 5)
    assert (pool.min_pool_size, pool.reserve_pool_size, pool.max_user_connections) == (2, 2, 5)
    assert pooler.limits_for("app").pool_size == 10  # default_pool_size 20 over two workers


def test_a_file_is_read_for_the_workers_running(tmp_path: Path) -> None:
    path = tmp_path / "pooler.yaml"
    # Meant for the next start (3 workers), valid for the 2 running: read as 2.
    path.write_text("auth_type: trust\nworkers: 3\ndefault_pool_size: 2\n")
    assert load_config(path, workers=2).workers == 2
    with pytest.raises(ConfigError, match="default_pool_size"):
        load_config(path)
    # Valid alone (1 worker), but the 2 running could not share a pool of 1.
    path.write_text("auth_type: trust\nworkers: 1\ndefault_pool_size: 1\n")
    assert load_config(path).default_pool_size == 1
    with pytest.raises(ConfigError, match=r"default_pool_size is 1, below workers \(2\)"):
        load_config(path, workers=2)
