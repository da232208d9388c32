"""The real kopf operator, as a process, against the emulated API server and a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import yaml

from .conftest import eventually

PGPOOLS = "pgfleet.io/v1alpha1/pgpools"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "/v1/configmaps"
SECRETS = "/v1/secrets"
SERVICES = "/v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
EVENTS = "/v1/events"
NS = "shop"


def pgpool(postgres: Any, name: str = "main", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "pgfleet.io/v1alpha1",
        "kind": "PgPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "database": {
                "host": "127.0.0.1",
                "port": postgres.port,
                "dbname": "postgres",
                "credentialsSecret": "db-creds",
            },
            "replicas": 3,
            "budget": {"maxBackends": 40, "reserve": 4},
            **spec,
        },
    }
    return body


def creds_secret() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "db-creds", "namespace": NS},
        "stringData": {"username": "md5user", "password": "md5pass"},
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return dict(cond)
    return None


def children(api: Any, name: str = "main") -> dict[str, Any]:
    return {
        "deployment": api.get(DEPLOYMENTS, NS, name),
        "service": api.get(SERVICES, NS, name),
        "config": api.get(CONFIGMAPS, NS, f"{name}-config"),
        "auth": api.get(SECRETS, NS, f"{name}-auth"),
        "token": api.get(SECRETS, NS, f"{name}-token"),
        "app": api.get(SECRETS, NS, f"{name}-app"),
        "pdb": api.get(PDBS, NS, name),
    }


async def test_create_update_delete(api: Any, operator: Any, postgres: Any) -> None:
    await api.put_object(SECRETS, creds_secret())
    created = await api.put_object(PGPOOLS, pgpool(postgres))
    uid = created["metadata"]["uid"]

    # create -> every child, owned by the PgPool, and a status that says what happened
    def reconciled(generation: int) -> dict[str, Any] | None:
        obj = api.get(PGPOOLS, NS, "main")
        return obj if obj and obj.get("status", {}).get("observedGeneration") == generation else None

    await eventually(lambda: reconciled(1), what="status.observedGeneration == 1")
    # The budget is the budget loop's, written once it has looked at the database.
    obj = await eventually(
        lambda: (o := reconciled(1)) and o["status"].get("budget", {}).get("total") == 36 and o,
        what="the loop's budget in status",
    )
    kids = children(api)
    assert all(kids.values()), {k: bool(v) for k, v in kids.items()}
    for kid in kids.values():
        (owner,) = kid["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["kind"] == "PgPool" and owner["controller"] is True
    status = obj["status"]
    assert status["selector"] == "app.kubernetes.io/instance=main,app.kubernetes.io/name=pgfleet-pooler"
    assert status["budget"]["maxConnections"] == 50 and status["budget"]["usable"] == 47
    assert "perPod" not in status["budget"]  # the even split of older versions is gone
    assert condition(obj, "DatabaseReachable")["status"] == "True"  # type: ignore[index]
    assert condition(obj, "BudgetEnforced")["status"] == "True"  # type: ignore[index]
    ready = condition(obj, "Ready")
    assert ready and ready["status"] == "False" and ready["reason"] == "PodsNotReady"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    config = yaml.safe_load(kids["config"]["data"]["pooler.yaml"])
    # A new pod starts at the floor (one backend per worker); the budget loop raises it live.
    assert config["databases"]["postgres"]["pool_size"] == 1

    # Pods becoming ready (the Deployment controller's job, played here) turn Ready true.
    await api.patch_object(DEPLOYMENTS, NS, "main", {"status": {"replicas": 3, "readyReplicas": 3}}, status=True)
    obj = await eventually(
        lambda: (c := condition(api.get(PGPOOLS, NS, "main"), "Ready")) and c["status"] == "True",
        what="Ready=True after the pods are ready",
    )

    # spec change -> children patched, new observedGeneration
    template_before = kids["deployment"]["spec"]["template"]
    await api.patch_object(PGPOOLS, NS, "main", {"spec": {"replicas": 5, "budget": {"maxBackends": 60}}})
    obj = await eventually(lambda: reconciled(2), what="status.observedGeneration == 2")
    kids = children(api)
    assert kids["deployment"]["spec"]["replicas"] == 5
    # 60 - 4 asked, but 47 usable backends leave less: the budget is what the server leaves (headroom).
    await eventually(
        lambda: (
            (b := (api.get(PGPOOLS, NS, "main") or {})["status"]["budget"])["total"] == min(56, b["headroom"])
            and b["total"] > 36
        ),
        what="the budget raised towards 60 - 4",
    )
    # A pool-size change reaches pods live; it must not roll them.
    assert kids["deployment"]["spec"]["template"] == template_before
    assert all(c["observedGeneration"] == 2 for c in obj["status"]["conditions"])

    await api.patch_object(PGPOOLS, NS, "main", {"spec": {"poolMode": "session", "replicas": 1}})
    await eventually(lambda: reconciled(3), what="status.observedGeneration == 3")
    kids = children(api)
    assert yaml.safe_load(kids["config"]["data"]["pooler.yaml"])["pool_mode"] == "session"
    assert kids["deployment"]["spec"]["template"] != template_before  # a restart-worthy change rolls
    assert kids["pdb"] is None  # one replica: no PodDisruptionBudget to block node drains

    # delete -> the PgPool and, through owner references, all its children are gone
    await api.delete_object(PGPOOLS, NS, "main")
    await eventually(lambda: api.get(PGPOOLS, NS, "main") is None, what="the PgPool to be deleted")
    assert not any(children(api).values())
    assert api.get(SECRETS, NS, "db-creds") is not None  # the user's Secret is not ours to delete


async def test_missing_secret_then_recovery(api: Any, operator: Any, postgres: Any) -> None:
    await api.put_object(PGPOOLS, pgpool(postgres, name="early"))

    def missing() -> Any:
        cond = condition(api.get(PGPOOLS, NS, "early"), "Ready")
        return cond if cond and cond["reason"] == "SecretMissing" else None

    cond = await eventually(missing, what="Ready=False with reason SecretMissing")
    assert cond["status"] == "False" and "db-creds" in cond["message"]
    event = await eventually(
        lambda: [e for e in api.all(EVENTS, NS) if e.get("reason") == "SecretMissing"], what="a SecretMissing Event"
    )
    assert event[0]["type"] == "Warning" and event[0]["involvedObject"]["name"] == "early"
    assert api.get(DEPLOYMENTS, NS, "early") is None  # nothing rendered without credentials

    await api.put_object(SECRETS, creds_secret())
    await eventually(lambda: api.get(DEPLOYMENTS, NS, "early"), what="the Deployment once the Secret exists")
    reachable = await eventually(
        lambda: (c := condition(api.get(PGPOOLS, NS, "early"), "DatabaseReachable")) and c["status"] == "True" and c,
        what="DatabaseReachable=True once the Secret exists",
    )
    assert reachable["reason"] == "Connected"


async def test_workers_split_the_pool_and_roll_the_pods(api: Any, operator: Any, postgres: Any) -> None:
    await api.put_object(SECRETS, creds_secret())
    await api.put_object(PGPOOLS, pgpool(postgres, pooler={"workers": 4}))

    def reconciled(generation: int) -> dict[str, Any] | None:
        obj = api.get(PGPOOLS, NS, "main")
        return obj if obj and obj.get("status", {}).get("observedGeneration") == generation else None

    await eventually(lambda: reconciled(1), what="status.observedGeneration == 1")
    kids = children(api)
    config = yaml.safe_load(kids["config"]["data"]["pooler.yaml"])
    assert config["workers"] == 4 and config["default_pool_size"] == 4  # the floor: one backend per worker
    assert kids["deployment"]["spec"]["replicas"] == 3  # 36 backends give 3 + 1 pods 4 each
    obj = await eventually(
        lambda: (c := condition(reconciled(1), "BudgetEnforced")) and c["status"] == "True" and reconciled(1),
        what="BudgetEnforced=True",
    )
    template_before = kids["deployment"]["spec"]["template"]

    # 36 backends cannot give 3 + 1 pods 10 each: the budget falls short, and no pod runs.
    await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"workers": 10}}})
    obj = await eventually(lambda: reconciled(2), what="status.observedGeneration == 2")
    enforced = condition(obj, "BudgetEnforced")
    assert enforced and enforced["status"] == "False" and enforced["reason"] == "BudgetTooSmall"
    assert "one backend per worker (10)" in enforced["message"]
    kids = children(api)
    assert kids["deployment"]["spec"]["replicas"] == 0
    assert yaml.safe_load(kids["config"]["data"]["pooler.yaml"])["workers"] == 10
    assert kids["deployment"]["spec"]["template"] != template_before  # the worker count needs new pods


async def test_the_database_is_observed_with_the_pgpools_tls_settings(
    api: Any, operator: Any, tls_postgres: Any
) -> None:
    """A database that refuses the clear (hostssl-only pg_hba): the status probe and the
    budget loop's observer connect with spec.tls, as the poolers do, and follow its changes."""
    pg, certs = tls_postgres
    await api.put_object(SECRETS, creds_secret() | {"stringData": {"username": "scramuser", "password": "scrampass"}})
    ca_secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-ca", "namespace": NS}}
    await api.put_object(SECRETS, ca_secret | {"stringData": {"ca.crt": certs.ca.cert_pem.bytes().decode()}})
    body = pgpool(pg, tls={"serverSslmode": "disable"})
    body["spec"]["database"]["host"] = "localhost"  # the name the database's certificate carries
    await api.put_object(PGPOOLS, body)

    def reachable(status: str, text: str) -> Any:
        cond = condition(api.get(PGPOOLS, NS, "main"), "DatabaseReachable")
        return cond if cond and cond["status"] == status and text in cond["message"] else None

    await eventually(lambda: reachable("False", "no encryption"), what="the clear refused by pg_hba")
    tls = {"serverSslmode": "verify-full", "serverCaSecret": "db-ca"}
    await api.patch_object(PGPOOLS, NS, "main", {"spec": {"tls": tls}})
    # "of others" is the budget loop's report: its kept connection reached the database too.
    cond = await eventually(lambda: reachable("True", "of others"), what="DatabaseReachable=True through TLS")
    assert "max_connections=50" in cond["message"]
    config = yaml.safe_load(children(api)["config"]["data"]["pooler.yaml"])
    assert config["server_tls_sslmode"] == "verify-full" and config["server_tls_ca_file"]


async def test_auth_query_reads_its_lookup_role_secret(api: Any, operator: Any, postgres: Any) -> None:
    await api.put_object(SECRETS, creds_secret())
    auth = {"authQuery": {"userSecret": "lookup-creds"}}
    await api.put_object(PGPOOLS, pgpool(postgres, clientAuth=auth))

    def missing() -> Any:
        cond = condition(api.get(PGPOOLS, NS, "main"), "Ready")
        return cond if cond and cond["reason"] == "SecretMissing" else None

    cond = await eventually(missing, what="Ready=False until the lookup role's Secret exists")
    assert "lookup-creds" in cond["message"]
    lookup = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "lookup-creds", "namespace": NS}}
    await api.put_object(SECRETS, lookup | {"stringData": {"username": "lookup", "password": "l00k"}})
    config_map = await eventually(lambda: api.get(CONFIGMAPS, NS, "main-config"), what="the rendered config")
    config = yaml.safe_load(config_map["data"]["pooler.yaml"])
    assert (config["auth_user"], config["auth_dbname"]) == ("lookup", "postgres")
    assert config["databases"]["postgres"].get("user") is None
    await eventually(
        lambda: (s := api.get(SECRETS, NS, "main-auth")) and '"lookup" "l00k"' in s["stringData"]["userlist.txt"],
        what="the lookup role in the rendered userlist",
    )


async def test_the_database_is_observed_with_the_pgpools_client_certificate(
    api: Any, operator: Any, tls_postgres: Any
) -> None:
    """tls.serverCertSecret: the operator, too, logs in where pg_hba says `cert`."""
    pg, certs = tls_postgres
    cert = certs.ca.issue_cert("certuser", common_name="certuser")
    await api.put_object(SECRETS, creds_secret() | {"stringData": {"username": "certuser", "password": "unused"}})
    for name, data in (
        ("db-ca", {"ca.crt": certs.ca.cert_pem.bytes().decode()}),
        (
            "db-client",
            {
                "tls.crt": b"".join(pem.bytes() for pem in cert.cert_chain_pems).decode(),
                "tls.key": cert.private_key_pem.bytes().decode(),
            },
        ),
    ):
        meta = {"name": name, "namespace": NS}
        await api.put_object(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data})
    tls = {"serverSslmode": "verify-full", "serverCaSecret": "db-ca", "serverCertSecret": "db-client"}
    body = pgpool(pg, tls=tls)
    body["spec"]["database"]["host"] = "localhost"
    await api.put_object(PGPOOLS, body)
    cond = await eventually(
        lambda: (
            (c := condition(api.get(PGPOOLS, NS, "main"), "DatabaseReachable"))
            and c["status"] == "True"
            and "of others" in c["message"]
            and c
        ),
        what="DatabaseReachable=True with the client certificate",
    )
    assert "max_connections=50" in cond["message"]
