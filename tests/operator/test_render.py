"""Every rendered child of a PgPool, as data."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from pgfleet.operator import model, render
from pgfleet.operator.budget import check_floors
from pgfleet.pooler.config import AuthType, PoolerConfig, PoolMode, parse_config
from pgfleet.pooler.userlist import parse_userlist

from .conftest import pgpool_body


def pool(**spec: Any) -> model.PgPool:
    return model.PgPool.model_validate(pgpool_body(**spec))


def facts_for(p: model.PgPool, usable: int | None = 97, **changes: Any) -> render.Facts:
    """As the reconcile gathers them: a pod starts at its floor, none while the budget cannot feed them."""
    floors = check_floors(
        replicas=p.spec.replicas,
        max_surge=p.spec.rollout.max_surge,
        max_backends=p.spec.budget.max_backends,
        max_backends_percent=p.spec.budget.max_backends_percent,
        reserve=p.spec.budget.reserve,
        usable=usable,
        workers=p.spec.pooler.workers,
    )
    base = render.Facts(
        image="pgfleet:1.2",
        username="app",
        password="s3cret",
        token="tok",
        start_limit=floors.start_limit,
        replicas_cap=0 if floors.shortfall else None,
    )
    return dataclasses.replace(base, **changes)


def children(**spec: Any) -> render.Children:
    p = pool(**spec)
    return render.render(p, facts_for(p))


def pod_spec(kids: render.Children) -> dict[str, Any]:
    return dict(kids.deployment["spec"]["template"]["spec"])


def test_config_map_is_a_pooler_config() -> None:
    kids = children()
    config = parse_config(yaml.safe_load(kids.config_map["data"]["pooler.yaml"]), "rendered")
    # A pod starts at its floor (one backend per worker); the budget loop raises it from there.
    assert config.default_pool_size == 1 and config.max_db_connections == 1
    assert (config.listen_addr, config.listen_port) == ("0.0.0.0", 5432)
    assert config.pool_mode is PoolMode.TRANSACTION
    assert config.auth_type is AuthType.SCRAM_SHA_256 and config.auth_file == render.USERLIST_FILE
    assert (config.http_listen_addr, config.http_listen_port) == ("0.0.0.0", render.HTTP_PORT)
    assert config.http_token_file == render.TOKEN_FILE
    db = config.databases["app"]
    assert (db.host, db.port, db.dbname, db.user) == ("db.example", 5432, "app", "app")
    assert db.pool_size == 1 and db.max_db_connections == 1
    assert db.password is None  # the password lives in the auth Secret, never in a ConfigMap


def test_pooler_settings_are_carried_over() -> None:
    kids = children(
        poolMode="statement",
        pooler={"maxClientConn": 5000, "queryWaitTimeout": 7, "shutdownTimeout": 50, "ignoreStartupParameters": ["x"]},
    )
    config = parse_config(yaml.safe_load(kids.config_map["data"]["pooler.yaml"]))
    assert config.pool_mode is PoolMode.STATEMENT and config.max_client_conn == 5000
    assert config.query_wait_timeout == 7 and config.shutdown_timeout == 50
    assert config.ignore_startup_parameters == ["x"]


def test_files_the_config_names_are_mounted() -> None:
    kids = children()
    spec = pod_spec(kids)
    (container,) = spec["containers"]
    assert container["command"] == ["pgfleet-pooler", "--config", render.CONFIG_FILE]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    paths = {
        f"{mount['mountPath']}/{item['path']}": (kind, src["name"])
        for source in volume["projected"]["sources"]
        for kind, src in source.items()
        for item in src["items"]
    }
    assert paths == {
        render.CONFIG_FILE: ("configMap", "main-config"),
        render.USERLIST_FILE: ("secret", "main-auth"),
        render.TOKEN_FILE: ("secret", "main-token"),
    }


def test_deployment_is_locked_down() -> None:
    spec = pod_spec(children())
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False
    # a read-only root still needs somewhere to write temporary files
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_probes_use_the_control_port() -> None:
    (container,) = pod_spec(children())["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"postgres": 5432, "http": render.HTTP_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("shutdown", [0, 30, 299.5])
def test_grace_period_outlasts_the_drain(shutdown: float) -> None:
    spec = pod_spec(children(pooler={"shutdownTimeout": shutdown}))
    assert spec["terminationGracePeriodSeconds"] > shutdown


def test_default_topology_spread_and_overrides() -> None:
    spread = pod_spec(children())["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)
    assert all(c["labelSelector"]["matchLabels"] == render.selector_labels("main") for c in spread)

    custom = [{"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule"}]
    tolerations = [{"key": "pool", "operator": "Exists"}]
    spec = pod_spec(
        children(
            pod={
                "topologySpreadConstraints": custom,
                "tolerations": tolerations,
                "nodeSelector": {"disk": "ssd"},
                "priorityClassName": "high",
                "affinity": {"nodeAffinity": {}},
            }
        )
    )
    assert spec["topologySpreadConstraints"] == custom and spec["tolerations"] == tolerations
    assert spec["nodeSelector"] == {"disk": "ssd"} and spec["priorityClassName"] == "high"
    assert spec["affinity"] == {"nodeAffinity": {}}


def test_resources_default_and_override() -> None:
    (container,) = pod_spec(children())["containers"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}}
    (container,) = pod_spec(children(pod={"resources": {"requests": {"cpu": 1}, "limits": {"memory": "1Gi"}}}))[
        "containers"
    ]
    assert container["resources"] == {"requests": {"cpu": 1}, "limits": {"memory": "1Gi"}}


def test_image_defaults_to_the_operators_and_can_be_overridden() -> None:
    assert pod_spec(children())["containers"][0]["image"] == "pgfleet:1.2"
    assert pod_spec(children(image="registry/pooler:9"))["containers"][0]["image"] == "registry/pooler:9"


def test_rollout_bounds_are_the_budgets() -> None:
    dep = children(rollout={"maxSurge": 2, "maxUnavailable": 1}).deployment
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 1}}
    assert dep["spec"]["replicas"] == 3


def test_no_pods_while_the_budget_cannot_feed_them() -> None:
    p = pool(replicas=3, budget={"maxBackendsPercent": 50})
    kids = render.render(p, facts_for(p, usable=None))  # a share of a server not measured yet
    assert kids.deployment["spec"]["replicas"] == 0


def rendered_config(kids: render.Children) -> PoolerConfig:
    return parse_config(yaml.safe_load(kids.config_map["data"]["pooler.yaml"]), "rendered")


def test_workers_are_carried_over() -> None:
    assert rendered_config(children()).workers == 1
    config = rendered_config(children(pooler={"workers": 4}))
    assert config.workers == 4
    # A pod starts with one backend per worker; the loop raises it, the pooler splits it among them.
    assert config.default_pool_size == 4 and config.databases["app"].pool_size == 4


# (replicas, maxSurge, budget, pooler) that put each limit at or next to `workers`.
EDGES = [
    (3, 1, {"maxBackends": 16}, {"workers": 4, "maxClientConn": 4}),  # 4 per pod: one per worker
    (3, 1, {"maxBackends": 15}, {"workers": 4}),  # 3 per pod < 4 workers: shortfall, pools 0
    (3, 1, {"maxBackends": 4}, {"workers": 64, "maxClientConn": 64}),  # 1 per pod < 64 workers
    (1, 1, {"maxBackends": 129}, {"workers": 64}),  # 64 per pod, exactly
    (3, 1, {"maxBackendsPercent": 10}, {"workers": 3}),  # 9 of 97 usable over 4 pods: 2 < 3
    (0, 0, {"maxBackends": 3}, {"workers": 4}),  # scaled to zero, budget below the workers
    (0, 0, {"maxBackends": 8}, {"workers": 4}),  # scaled to zero, the whole budget
    (2, 1, {"maxBackends": 300, "reserve": 297}, {"workers": 2}),  # the reserve leaves 1 per pod < 2
]


@pytest.mark.parametrize(("replicas", "max_surge", "budget", "pooler"), EDGES)
def test_pooler_accepts_every_rendered_config(
    replicas: int, max_surge: int, budget: dict[str, int], pooler: dict[str, int]
) -> None:
    p = pool(replicas=replicas, rollout={"maxSurge": max_surge, "maxUnavailable": 1}, budget=budget, pooler=pooler)
    facts = facts_for(p)
    config = rendered_config(render.render(p, facts))  # parse_config raises on any limit below workers
    assert config.workers == pooler["workers"]
    start = facts.start_limit
    assert start in (0, config.workers)
    assert config.default_pool_size == start and config.databases["app"].pool_size == start
    # Pods are rendered only where every one of them gets its floor.
    if render.render(p, facts).deployment["spec"]["replicas"]:
        assert (replicas + max_surge) * start <= budget.get("maxBackends", 97) - budget.get("reserve", 0)


def test_every_valid_pool_renders_for_every_worker_count() -> None:
    for workers in (1, 2, 3, 8, 64):
        for replicas in range(0, 12):
            for max_backends in range(replicas + 1, 200, 7):
                p = pool(replicas=replicas, budget={"maxBackends": max_backends}, pooler={"workers": workers})
                facts = facts_for(p)
                pods = render.render(p, facts).deployment["spec"]["replicas"]
                assert pods == 0 or (pods + 1) * facts.start_limit <= max_backends  # floors, the surge's too
                assert render.pooler_config(p, facts).workers == workers  # PoolerConfig refuses nothing


def test_no_pods_while_the_budget_cannot_feed_every_worker() -> None:
    kids = children(replicas=3, budget={"maxBackends": 15}, pooler={"workers": 4})  # 15 // 4 = 3 < 4
    assert kids.deployment["spec"]["replicas"] == 0
    assert rendered_config(kids).default_pool_size == 0


def test_a_workers_change_rolls_the_pods() -> None:
    # A running pooler cannot change its worker count: only new pods get it.
    assert _template_hash(children(pooler={"workers": 2})) != _template_hash(children())
    assert _template_hash(children(pooler={"workers": 2})) != _template_hash(children(pooler={"workers": 3}))


def _template_hash(kids: render.Children) -> str:
    return str(kids.deployment["spec"]["template"]["metadata"]["annotations"][render.CONFIG_HASH])


def test_pool_limits_do_not_roll_pods_but_settings_do() -> None:
    base = _template_hash(children())
    # Budget and replicas change only pool sizes: pushed live, same pod template.
    assert _template_hash(children(replicas=7, budget={"maxBackends": 90, "reserve": 1})) == base
    assert _template_hash(children(poolMode="session")) != base
    assert _template_hash(children(pooler={"serverLifetime": 60})) != base
    p = pool()
    rotated = render.render(p, facts_for(p, password="new"))
    assert _template_hash(rotated) != base  # a new password needs the pods to reread the userlist


def test_the_pause_reaches_new_pods_through_the_config_map_and_never_rolls_the_pods() -> None:
    serving, paused = children(), children(pooler={"paused": True})

    def config(kids: render.Children) -> PoolerConfig:
        return parse_config(yaml.safe_load(kids.config_map["data"]["pooler.yaml"]), "rendered")

    assert config(serving).start_paused is False and config(paused).start_paused is True
    assert paused.config_map["metadata"]["annotations"] != serving.config_map["metadata"]["annotations"]
    # The Deployment is the same object, so toggling the pause patches nothing that rolls pods.
    assert paused.deployment == serving.deployment


def test_every_child_is_owned_stamped_and_labelled() -> None:
    kids = children()
    for obj in kids.present():
        meta = obj["metadata"]
        assert meta["namespace"] == "shop"
        assert meta["ownerReferences"] == [
            {"apiVersion": "pgfleet.io/v1alpha1", "kind": "PgPool", "name": "main", "uid": "1234-uid",
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
        assert len(meta["annotations"][render.SPEC_HASH]) == 16
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "pgfleet-operator"
    assert [o["kind"] for o in kids.present()] == [
        "ConfigMap", "Secret", "Secret", "Secret", "Service", "Deployment", "PodDisruptionBudget"
    ]  # fmt: skip


def test_spec_hash_is_deterministic_and_tracks_content() -> None:
    a, b = children(), children()
    assert [o["metadata"]["annotations"][render.SPEC_HASH] for o in a.present()] == [
        o["metadata"]["annotations"][render.SPEC_HASH] for o in b.present()
    ]
    c = children(service={"type": "LoadBalancer"})
    assert (
        c.service["metadata"]["annotations"][render.SPEC_HASH] != a.service["metadata"]["annotations"][render.SPEC_HASH]
    )
    assert c.deployment == a.deployment


def test_service_fronts_the_pods() -> None:
    kids = children(service={"type": "NodePort", "annotations": {"lb": "yes"}})
    svc = kids.service
    assert svc["metadata"]["name"] == "main"
    assert svc["spec"]["type"] == "NodePort" and svc["metadata"]["annotations"]["lb"] == "yes"
    assert svc["spec"]["ports"] == [{"name": "postgres", "port": 5432, "targetPort": "postgres", "protocol": "TCP"}]
    pod_labels = kids.deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert kids.deployment["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_app_secret_has_a_ready_uri() -> None:
    p = pool()
    secret = render.render(p, facts_for(p, username="app", password="p@ss:/word")).app_secret
    data = secret["stringData"]
    assert secret["metadata"]["name"] == "main-app"
    assert data["host"] == "main.shop.svc" and data["port"] == "5432" and data["dbname"] == "app"
    uri = urlparse(data["uri"])
    assert (uri.scheme, uri.hostname, uri.port, uri.path) == ("postgresql", "main.shop.svc", 5432, "/app")
    assert unquote(uri.username or "") == "app" and unquote(uri.password or "") == "p@ss:/word"


def test_app_secret_uses_the_first_client_user() -> None:
    p = pool()
    secret = render.render(p, facts_for(p, client_userlist={"shop": "x", "bi": "y"})).app_secret
    assert (secret["stringData"]["username"], secret["stringData"]["password"]) == ("shop", "x")


def test_userlist_has_the_server_role_and_the_clients() -> None:
    p = pool()
    facts = facts_for(p, username='we"ird', password="pw", client_userlist={"shop": "x", 'we"ird': "not this"})
    text = render.render(p, facts).auth_secret["stringData"]["userlist.txt"]
    assert parse_userlist(text) == {'we"ird': "pw", "shop": "x"}


def test_token_secret_holds_the_token() -> None:
    assert children().token_secret["stringData"] == {"token": "tok"}


def test_pdb_only_with_more_than_one_replica() -> None:
    assert children(replicas=1).pdb is None
    pdb = children(replicas=2).pdb
    assert pdb is not None
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": render.selector_labels("main")}}


def test_a_pod_starts_at_the_floor_and_the_deployment_can_be_held() -> None:
    p = pool(pooler={"workers": 2})
    facts = dataclasses.replace(facts_for(p), start_limit=2, replicas_cap=2)
    children = render.render(p, facts)
    config = PoolerConfig.model_validate(yaml.safe_load(children.config_map["data"]["pooler.yaml"]))
    assert config.default_pool_size == config.max_db_connections == 2
    assert config.databases["app"].pool_size == config.databases["app"].max_db_connections == 2
    assert children.deployment["spec"]["replicas"] == 2  # spec.replicas is 3: held until pods confirm


def test_tls_secrets_are_mounted_and_named_in_the_config() -> None:
    tls = {"clientCertSecret": "main-cert", "serverCaSecret": "db-ca", "serverSslmode": "verify-full"}
    kids = children(tls=tls)
    config = rendered_config(kids)
    assert config.client_tls_sslmode.value == "require"
    assert (config.client_tls_cert_file, config.client_tls_key_file) == (
        render.CLIENT_CERT_FILE,
        render.CLIENT_KEY_FILE,
    )
    assert (config.server_tls_sslmode.value, config.server_tls_ca_file) == ("verify-full", render.SERVER_CA_FILE)
    spec = pod_spec(kids)
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    paths = {
        f"{mount['mountPath']}/{item['path']}": (src["name"], item["key"])
        for source in volume["projected"]["sources"]
        for src in source.values()
        for item in src["items"]
    }
    assert paths[render.CLIENT_CERT_FILE] == ("main-cert", "tls.crt")
    assert paths[render.CLIENT_KEY_FILE] == ("main-cert", "tls.key")
    assert paths[render.SERVER_CA_FILE] == ("db-ca", "ca.crt")
    # Applications are told to use TLS, which the poolers now demand.
    data = kids.app_secret["stringData"]
    assert data["sslmode"] == "require" and data["uri"].endswith("/app?sslmode=require")
    # A TLS change rolls the pods (a running pooler rereads rotated files, not new settings).
    assert _template_hash(kids) != _template_hash(children())


def test_without_tls_the_server_leg_prefers_it_and_clients_need_none() -> None:
    config = rendered_config(children())
    assert (config.client_tls_sslmode.value, config.server_tls_sslmode.value) == ("disable", "prefer")
    assert "sslmode" not in children().app_secret["stringData"]


def test_auth_query_looks_clients_up_and_lets_each_log_in_as_itself() -> None:
    """clientAuth.authQuery: auth_user/auth_query/auth_dbname, and no forced server user."""
    kids = children(clientAuth={"authQuery": {}})
    config = rendered_config(kids)
    assert (config.auth_user, config.auth_dbname) == ("app", "app")  # the credentialsSecret role, the database
    assert config.auth_query == PoolerConfig.model_fields["auth_query"].default
    assert config.databases["app"].user is None  # each client's own role, one pool per role
    assert config.databases["app"].max_db_connections == 1  # the pod's limit (its floor here) still caps the database
    assert parse_userlist(kids.auth_secret["stringData"]["userlist.txt"]) == {"app": "s3cret"}  # no client's


def test_auth_query_with_a_lookup_role_of_its_own() -> None:
    query = "SELECT usename, passwd FROM pgfleet.lookup($1)"
    p = pool(clientAuth={"authQuery": {"query": query, "userSecret": "lookup-creds"}})
    kids = render.render(p, facts_for(p, auth_user=("lookup", "l00k")))
    config = rendered_config(kids)
    assert (config.auth_user, config.auth_query) == ("lookup", query)
    # The lookup role logs in with its password from the rendered userlist.
    assert parse_userlist(kids.auth_secret["stringData"]["userlist.txt"]) == {"app": "s3cret", "lookup": "l00k"}


def test_without_auth_query_every_client_is_the_credentials_role() -> None:
    config = rendered_config(children())
    assert config.auth_user is None and config.auth_dbname is None
    assert config.databases["app"].user == "app"


def test_a_client_certificate_towards_the_database_is_mounted_and_named() -> None:
    kids = children(tls={"serverCertSecret": "db-client", "serverSslmode": "verify-full", "serverCaSecret": "db-ca"})
    config = rendered_config(kids)
    assert (config.server_tls_cert_file, config.server_tls_key_file) == (
        render.SERVER_CERT_FILE,
        render.SERVER_KEY_FILE,
    )
    spec = pod_spec(kids)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    paths = {
        f"{render.CONFIG_DIR}/{item['path']}": (src["name"], item["key"])
        for source in volume["projected"]["sources"]
        for src in source.values()
        for item in src["items"]
    }
    assert paths[render.SERVER_CERT_FILE] == ("db-client", "tls.crt")
    assert paths[render.SERVER_KEY_FILE] == ("db-client", "tls.key")
    assert paths[render.SERVER_CA_FILE] == ("db-ca", "ca.crt")
    # Applications still talk to the poolers in the clear: this is the database leg only.
    assert config.client_tls_sslmode.value == "disable"
    assert rendered_config(children()).server_tls_cert_file is None
