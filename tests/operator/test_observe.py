"""Measuring a real PostgreSQL: reachable with facts, or unreachable with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from pgfleet.operator.observe import AsyncpgProbe, DatabaseTarget, DatabaseUnreachable, ServerObserver


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


async def test_the_kept_connection_sees_a_full_server_and_tells_backends_apart(postgres: Any) -> None:
    import asyncpg
    from pgfleet.operator.observe import ServerObserver

    postgres.sql("DROP ROLE IF EXISTS limited; CREATE ROLE limited LOGIN CONNECTION LIMIT 7")
    observer = ServerObserver(postgres.dsn("scramuser", "postgres"), timeout=2)
    held: list[asyncpg.Connection] = []
    try:
        first = await observer.snapshot(roles=["limited", "nosuchrole"], databases=["postgres"])
        assert (first.max_connections, first.superuser_reserved) == (50, 3)
        assert first.reserved == 0  # reserved_connections: absent before PostgreSQL 16, 0 by default since
        assert first.role_limits == {"limited": 7} and first.database_limits == {"postgres": -1}
        # Fill every slot a non-superuser may take: PostgreSQL refuses the next one.
        while True:
            try:
                held.append(await asyncpg.connect(postgres.dsn("limited", "postgres")))
            except asyncpg.TooManyConnectionsError:
                break
            if len(held) == 7:
                held.append(await asyncpg.connect(postgres.dsn("md5user", "postgres")))
                if len(held) > 60:
                    raise AssertionError("the server never filled up")
        full = await observer.snapshot(roles=["limited"])  # the kept connection still works
        mine = {await held[0].fetchval("SELECT pg_backend_pid()"), await held[1].fetchval("SELECT pg_backend_pid()")}
        facts = full.facts(fleet_pids=mine)
        assert full.held_by(mine) == 2
        assert facts.others == len(full.backends) - 2 - 1  # everything but the fleet's and the observer
        assert facts.others_by_role["limited"] == 5
        assert facts.role_limits["limited"] == 7
    finally:
        for conn in held:
            await conn.close()
        await observer.close()
        postgres.sql("DROP ROLE limited")


async def test_a_lost_observer_connection_is_unreachable_then_reopened(postgres: Any) -> None:
    from pgfleet.operator.observe import ServerObserver

    observer = ServerObserver(postgres.dsn("scramuser", "postgres"), timeout=2)
    try:
        snap = await observer.snapshot()
        postgres.sql(f"SELECT pg_terminate_backend({snap.observer_pid})")
        with pytest.raises(DatabaseUnreachable, match=r"scramuser:\*\*\*@"):
            await observer.snapshot()  # the password never reaches a message
        again = await observer.snapshot()
        assert again.observer_pid != snap.observer_pid
    finally:
        await observer.close()


# -- a database that refuses the clear: the PgPool's TLS settings (spec.tls) ------------------------
def tls_target(tls_postgres: Any, **changes: Any) -> DatabaseTarget:
    pg, certs = tls_postgres
    fields = {
        "host": "localhost",  # the name PostgreSQL's certificate carries
        "sslmode": "verify-full",
        "ca": certs.ca.cert_pem.bytes().decode(),
        **changes,
    }
    return target(pg, **fields)


async def test_probe_and_observer_reach_a_hostssl_only_database_with_the_tls_settings(tls_postgres: Any) -> None:
    facts = await AsyncpgProbe(timeout=5)(tls_target(tls_postgres))
    assert facts.max_connections == 50
    for sslmode in ("require", "verify-ca", "prefer", "allow"):
        facts = await AsyncpgProbe(timeout=5)(tls_target(tls_postgres, host="127.0.0.1", sslmode=sslmode))
        assert facts.max_connections == 50, sslmode
    observer = ServerObserver(target=tls_target(tls_postgres), timeout=5)
    try:
        snapshot = await observer.snapshot(databases=["postgres"])
        assert snapshot.max_connections == 50 and snapshot.observer_pid > 0
    finally:
        await observer.close()


async def test_tls_settings_are_honoured_never_loosened(tls_postgres: Any) -> None:
    """Each refusal names its reason; none falls back to a weaker mode."""
    _, certs = tls_postgres
    probe = AsyncpgProbe(timeout=5)
    with pytest.raises(DatabaseUnreachable, match="no encryption"):
        await probe(tls_target(tls_postgres, sslmode="disable"))
    # 127.0.0.1 is not a name the certificate carries: verify-full refuses it.
    with pytest.raises(DatabaseUnreachable, match=r"(?i)certificate verify failed|IP address mismatch"):
        await probe(tls_target(tls_postgres, host="127.0.0.1"))
    with pytest.raises(DatabaseUnreachable, match=r"(?i)certificate verify failed"):
        await probe(tls_target(tls_postgres, sslmode="verify-ca", ca=certs.other_ca.cert_pem.bytes().decode()))
    with pytest.raises(DatabaseUnreachable, match="TLS settings"):
        await probe(tls_target(tls_postgres, ca="not a certificate"))


async def test_the_observer_follows_new_tls_settings(tls_postgres: Any) -> None:
    observer = ServerObserver(target=tls_target(tls_postgres, sslmode="disable"), timeout=5)
    try:
        with pytest.raises(DatabaseUnreachable, match="no encryption"):
            await observer.snapshot()
        observer.retarget(tls_target(tls_postgres))
        assert (await observer.snapshot()).max_connections == 50
    finally:
        await observer.close()


async def test_a_client_certificate_logs_the_probe_in_where_pg_hba_says_cert(tls_postgres: Any) -> None:
    """pg_hba `cert` for certuser: the certificate's CN is the user, no password is asked."""
    _, certs = tls_postgres
    cert = certs.ca.issue_cert("certuser", common_name="certuser")
    with_cert = tls_target(
        tls_postgres, user="certuser", password="", cert=b"".join(p.bytes() for p in cert.cert_chain_pems).decode(),
        key=cert.private_key_pem.bytes().decode(),
    )  # fmt: skip
    assert (await AsyncpgProbe(timeout=5)(with_cert)).max_connections == 50
    observer = ServerObserver(target=with_cert, timeout=5)
    try:
        assert (await observer.snapshot()).max_connections == 50
    finally:
        await observer.close()
    with pytest.raises(DatabaseUnreachable, match="certificate"):
        await AsyncpgProbe(timeout=5)(tls_target(tls_postgres, user="certuser", password=""))
