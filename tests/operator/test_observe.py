"""Measuring a real PostgreSQL: reachable with facts, or unreachable with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from pgfleet.operator.observe import AsyncpgProbe, DatabaseTarget, DatabaseUnreachable


def target(postgres: Any, **changes: Any) -> DatabaseTarget:
    fields = {
        "host": "127.0.0.1",
        "port": postgres.port,
        "dbname": "postgres",
        "user": "scramuser",
        "password": "scrampass",
    }
    fields.update(changes)
    return DatabaseTarget(**fields)


async def test_facts_of_a_reachable_database(postgres: Any) -> None:
    import asyncpg

    facts = await AsyncpgProbe()(target(postgres))
    assert facts.max_connections == 50
    before = facts.backends_in_use
    conn = await asyncpg.connect(postgres.dsn("scramuser", "postgres"))
    try:
        # the probe's own connection is not counted; another of the same role is
        assert (await AsyncpgProbe()(target(postgres))).backends_in_use == before + 1
    finally:
        await conn.close()


async def test_wrong_password_is_unreachable_with_the_reason(postgres: Any) -> None:
    with pytest.raises(DatabaseUnreachable, match="password authentication failed"):
        await AsyncpgProbe()(target(postgres, password="wrong"))


async def test_nothing_listening_is_unreachable(postgres: Any) -> None:
    from pgfleet.devtools.tempdb import free_port

    port = free_port()
    with pytest.raises(DatabaseUnreachable, match=f"127.0.0.1:{port}/postgres"):
        await AsyncpgProbe(timeout=2)(target(postgres, port=port))
