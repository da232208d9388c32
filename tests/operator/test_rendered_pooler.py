"""What the operator renders, run by a real pooler against a real PostgreSQL.

The pod's config volume is laid out as the kubelet projects it (the Deployment's
projected sources: the ConfigMap, the rendered Secrets, the user's Secrets), under a
temporary directory instead of /etc/pgfleet; the pooler then runs that config in-process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pgfleet.devtools.procs import free_port
from pgfleet.operator import model, render
from pgfleet.operator.budget import check_floors
from pgfleet.pooler.config import parse_config
from pgfleet.pooler.pooler import Pooler

from .conftest import pgpool_body

Run = Callable[..., Any]


def render_for(pg: Any, username: str, password: str, **spec: Any) -> tuple[model.PgPool, render.Children]:
    body = pgpool_body(**spec)
    body["spec"]["database"] = {
        "host": "127.0.0.1",
        "port": pg.port,
        "dbname": "postgres",
        "credentialsSecret": "db-creds",
        **spec.get("database", {}),
    }
    pgpool = model.PgPool.model_validate(body)
    s = pgpool.spec
    floors = check_floors(
        replicas=s.replicas, max_surge=s.rollout.max_surge, max_backends=s.budget.max_backends,
        max_backends_percent=s.budget.max_backends_percent, reserve=s.budget.reserve, usable=47,
        workers=s.pooler.workers,
    )  # fmt: skip
    facts = render.Facts(
        image="pgfleet:test", username=username, password=password, token="t", start_limit=floors.start_limit
    )
    return pgpool, render.render(pgpool, facts)


def project(kids: render.Children, user_secrets: dict[str, dict[str, str]], root: Path) -> Path:
    """The config volume as the kubelet would write it; returns the config file's path."""
    objects: dict[tuple[str, str], dict[str, str]] = {
        ("configMap", kids.config_map["metadata"]["name"]): kids.config_map["data"]
    }
    for secret in (kids.auth_secret, kids.token_secret, kids.app_secret):
        objects[("secret", secret["metadata"]["name"])] = secret["stringData"]
    for name, data in user_secrets.items():
        objects[("secret", name)] = data
    (volume,) = [v for v in kids.deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    for source in volume["projected"]["sources"]:
        ((kind, ref),) = source.items()
        data = objects[(kind, ref["name"])]
        for item in ref["items"]:
            path = root / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]].replace(render.CONFIG_DIR, str(root)))
            path.chmod(0o600)
    return root / "pooler.yaml"


@pytest.fixture
async def run_rendered(tmp_path: Path) -> AsyncIterator[Run]:
    started: list[Pooler] = []

    async def run(kids: render.Children, user_secrets: dict[str, dict[str, str]] | None = None) -> Pooler:
        root = tmp_path / f"pod{len(started)}"
        settings = yaml.safe_load(project(kids, user_secrets or {}, root).read_text())
        # Loopback and free ports in place of the pod's own network namespace.
        settings.update(listen_addr="127.0.0.1", listen_port=free_port(), http_listen_addr="127.0.0.1")
        settings["http_listen_port"] = free_port()
        pooler = Pooler(parse_config(settings, "rendered"))
        await pooler.start()
        started.append(pooler)
        return pooler

    yield run
    for pooler in started:
        await pooler.stop()


async def login(port: int, user: str, password: str) -> str:
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=port, user=user, password=password, dbname="postgres"
    ) as conn:
        cur = await conn.execute("SELECT current_user")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


@pytest.mark.parametrize(
    ("auth_type", "users"),
    [
        # SCRAM verifiers; an md5 hash cannot answer a SCRAM exchange (as in PgBouncer).
        ("scram-sha-256", [("scramuser", "scrampass")]),
        ("md5", [("md5user", "md5pass"), ("scramuser", "scrampass")]),
    ],
)
async def test_auth_query_clients_log_in_as_themselves_without_a_userlist(
    postgres: Any, run_rendered: Run, auth_type: str, users: list[tuple[str, str]]
) -> None:
    """clientAuth.authQuery: the clients are in no Secret; the pooler looks them up (as the
    credentials role, plainuser) and each logs in to PostgreSQL as itself."""
    _, kids = render_for(postgres, "plainuser", "plainpass", clientAuth={"authType": auth_type, "authQuery": {}})
    port = (await run_rendered(kids)).config.listen_port
    for user, password in users:
        assert await login(port, user, password) == user
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await login(port, users[0][0], "wrong")
    # Without authQuery the same client is unknown: only the credentials role is in the userlist.
    _, plain = render_for(postgres, "plainuser", "plainpass", clientAuth={"authType": auth_type})
    port = (await run_rendered(plain)).config.listen_port
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await login(port, *users[0])


async def test_a_client_certificate_from_a_secret_logs_the_pooler_in_where_pg_hba_says_cert(
    tls_postgres: Any, run_rendered: Run
) -> None:
    """tls.serverCertSecret against a PostgreSQL that refuses the clear and wants certuser's
    certificate (pg_hba `cert`, i.e. clientcert=verify-full): no database password at all."""
    pg, certs = tls_postgres
    cert = certs.ca.issue_cert("certuser", common_name="certuser")
    client_secret = {
        "tls.crt": b"".join(pem.bytes() for pem in cert.cert_chain_pems).decode(),
        "tls.key": cert.private_key_pem.bytes().decode(),
    }
    ca_secret = {"ca.crt": certs.ca.cert_pem.bytes().decode()}
    tls = {"serverSslmode": "verify-full", "serverCaSecret": "db-ca", "serverCertSecret": "db-client"}
    # The password is the one applications give the pooler; PostgreSQL asks for none.
    _, kids = render_for(pg, "certuser", "apppass", tls=tls, database={"host": "localhost"})
    port = (await run_rendered(kids, {"db-ca": ca_secret, "db-client": client_secret})).config.listen_port
    assert await login(port, "certuser", "apppass") == "certuser"
    # The same PgPool without the certificate Secret is refused by the database.
    _, without = render_for(
        pg, "certuser", "apppass", tls={**tls, "serverCertSecret": None}, database={"host": "localhost"}
    )
    port = (await run_rendered(without, {"db-ca": ca_secret})).config.listen_port
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        await login(port, "certuser", "apppass")
