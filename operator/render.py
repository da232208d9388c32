"""Desired children of a PgPool, as plain Kubernetes objects: pure functions, no API calls.

`render(pgpool, facts)` returns every object the operator keeps for one PgPool. Each
object carries a `pgfleet.io/spec-hash` annotation over its own content, so the operator
patches only what changed. The pod template carries `pgfleet.io/config-hash` over the
pooler settings that need a restart; pool limits and the traffic pause are left out of
it on purpose, because they are pushed to running pods (PUT /limits, PUT /pause) instead
of rolling them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pgfleet.pooler.config import AuthType, DatabaseConfig, PoolerConfig, SslMode, dump_config
from pgfleet.pooler.userlist import dump_userlist

from . import model, templates

Obj = dict[str, Any]

SPEC_HASH = "pgfleet.io/spec-hash"
CONFIG_HASH = "pgfleet.io/config-hash"

POSTGRES_PORT = 5432
HTTP_PORT = 8080
CONFIG_DIR = "/etc/pgfleet"
CONFIG_FILE = f"{CONFIG_DIR}/pooler.yaml"
USERLIST_FILE = f"{CONFIG_DIR}/userlist.txt"
TOKEN_FILE = f"{CONFIG_DIR}/token"
# spec.tls: files projected from the user's Secrets into the config volume (read-only).
CLIENT_CERT_FILE = f"{CONFIG_DIR}/tls/client.crt"
CLIENT_KEY_FILE = f"{CONFIG_DIR}/tls/client.key"
SERVER_CA_FILE = f"{CONFIG_DIR}/tls/server-ca.crt"
SERVER_CERT_FILE = f"{CONFIG_DIR}/tls/server-client.crt"  # the poolers' certificate towards the database
SERVER_KEY_FILE = f"{CONFIG_DIR}/tls/server-client.key"
# The image's user (see Dockerfile); numeric so the kubelet can check runAsNonRoot.
POOLER_UID = 10001
# Time past the pooler's own drain for the process to exit before SIGKILL.
GRACE_MARGIN_SECONDS = 15


@dataclass(frozen=True, slots=True)
class Facts:
    """What rendering needs beyond the PgPool itself; the handlers gather it."""

    image: str
    username: str  # role the poolers log in to PostgreSQL as
    password: str
    token: str  # bearer token of the pooler's HTTP control port
    # The pool a pod starts with (its floor, one backend per worker; 0 when the budget cannot
    # feed every pod): the budget loop moves each running pod from there.
    start_limit: int
    client_userlist: dict[str, str] | None = None  # from clientAuth.userlistSecret
    # (username, password) from clientAuth.authQuery.userSecret: the role auth_query runs as.
    auth_user: tuple[str, str] | None = None
    # The Deployment may not grow past this: 0 while the budget cannot feed the pods, the
    # replicas it has while a running pod's limit is unconfirmed; None: spec.replicas.
    replicas_cap: int | None = None


@dataclass(frozen=True, slots=True)
class Children:
    config_map: Obj
    auth_secret: Obj
    token_secret: Obj
    app_secret: Obj
    service: Obj
    deployment: Obj
    pdb: Obj | None  # None: there must be no PodDisruptionBudget

    def present(self) -> list[Obj]:
        objs = [self.config_map, self.auth_secret, self.token_secret, self.app_secret, self.service, self.deployment]
        return [*objs, self.pdb] if self.pdb is not None else objs


# -- names and labels -------------------------------------------------------------------
def config_map_name(name: str) -> str:
    return f"{name}-config"


def auth_secret_name(name: str) -> str:
    return f"{name}-auth"


def token_secret_name(name: str) -> str:
    return f"{name}-token"


def app_secret_name(name: str) -> str:
    return f"{name}-app"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "pgfleet-pooler", "app.kubernetes.io/instance": name}


def selector_string(name: str) -> str:
    """The pods' label selector in the string form the scale subresource reports."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def common_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/component": "pooler",
        "app.kubernetes.io/managed-by": "pgfleet-operator",
    }


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _meta(pgpool: model.PgPool, name: str, annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": pgpool.namespace,
        "labels": common_labels(pgpool.name),
        "ownerReferences": [
            {
                "apiVersion": pgpool.api_version,
                "kind": pgpool.kind,
                "name": pgpool.name,
                "uid": pgpool.metadata["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _stamped(obj: Obj) -> Obj:
    """The object with a hash of its own content in `pgfleet.io/spec-hash`."""
    digest = spec_hash(obj)
    obj["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
    return obj


# -- the pooler's configuration ---------------------------------------------------------
def pooler_config(pgpool: model.PgPool, facts: Facts) -> PoolerConfig:
    # PoolerConfig refuses a nonzero limit below `workers`; none is rendered: the model keeps
    # maxClientConn >= workers, and the start limit is 0 or the worker count (budget.Floors).
    spec = pgpool.spec
    pooler = spec.pooler
    per_pod = facts.start_limit
    return PoolerConfig(
        listen_addr="0.0.0.0",
        listen_port=POSTGRES_PORT,
        # Not a limit: it stays in the pod template's config hash, so a change rolls the pods
        # (a running pooler cannot change its worker count).
        workers=pooler.workers,
        auth_type=AuthType(spec.client_auth.auth_type.value),
        auth_file=USERLIST_FILE,
        pool_mode=spec.pool_mode,
        max_client_conn=pooler.max_client_conn,
        default_pool_size=per_pod,
        # The hard cap: whatever users connect as, one pod never holds more backends.
        max_db_connections=per_pod,
        max_prepared_statements=pooler.max_prepared_statements,
        query_wait_timeout=pooler.query_wait_timeout,
        query_timeout=pooler.query_timeout,
        client_idle_timeout=pooler.client_idle_timeout,
        idle_transaction_timeout=pooler.idle_transaction_timeout,
        server_idle_timeout=pooler.server_idle_timeout,
        server_lifetime=pooler.server_lifetime,
        server_connect_timeout=pooler.server_connect_timeout,
        shutdown_timeout=pooler.shutdown_timeout,
        ignore_startup_parameters=list(pooler.ignore_startup_parameters),
        **auth_query_settings(spec, facts),
        **tls_settings(spec.tls),
        http_listen_addr="0.0.0.0",
        http_listen_port=HTTP_PORT,
        http_token_file=TOKEN_FILE,
        # spec.pooler.paused for pods that start now: paused before their first client. Running
        # pods get the change by PUT /pause (traffic.py), and the budget loop pushes it to any
        # pod that came up with the ConfigMap's previous state (kubelet updates files lazily).
        start_paused=pooler.paused,
        databases={
            spec.database.dbname: DatabaseConfig(
                host=spec.database.host,
                port=spec.database.port,
                dbname=spec.database.dbname,
                # With auth_query each client logs in as its own role (one pool per role);
                # max_db_connections still caps the database's backends per pod.
                user=None if spec.client_auth.auth_query else facts.username,
                pool_size=per_pod,
                max_db_connections=per_pod,
            )
        },
    )


def auth_query_settings(spec: model.PgPoolSpec, facts: Facts) -> dict[str, Any]:
    """auth_user/auth_query/auth_dbname for clientAuth.authQuery (nothing when unset)."""
    lookup = spec.client_auth.auth_query
    if lookup is None:
        return {}
    return {
        "auth_user": facts.auth_user[0] if facts.auth_user else facts.username,
        "auth_query": lookup.query,
        # The one database the poolers front: a client of any other is refused anyway.
        "auth_dbname": spec.database.dbname,
    }


def tls_settings(tls: model.TlsSpec) -> dict[str, Any]:
    """The pooler's TLS settings for spec.tls: the files the Deployment mounts."""
    settings: dict[str, Any] = {"server_tls_sslmode": tls.server_sslmode}
    if tls.client_cert_secret:
        settings.update(
            client_tls_sslmode=SslMode.REQUIRE,
            client_tls_cert_file=CLIENT_CERT_FILE,
            client_tls_key_file=CLIENT_KEY_FILE,
        )
    if tls.server_ca_secret:
        settings["server_tls_ca_file"] = SERVER_CA_FILE
    if tls.server_cert_secret:
        settings.update(server_tls_cert_file=SERVER_CERT_FILE, server_tls_key_file=SERVER_KEY_FILE)
    return settings


def _tls_sources(tls: model.TlsSpec) -> list[Obj]:
    """Projected-volume sources of the TLS files (paths relative to CONFIG_DIR)."""
    sources: list[Obj] = []
    if tls.client_cert_secret:
        items = [{"key": "tls.crt", "path": "tls/client.crt"}, {"key": "tls.key", "path": "tls/client.key"}]
        sources.append({"secret": {"name": tls.client_cert_secret, "items": items}})
    if tls.server_ca_secret:
        sources.append(
            {"secret": {"name": tls.server_ca_secret, "items": [{"key": "ca.crt", "path": "tls/server-ca.crt"}]}}
        )
    if tls.server_cert_secret:
        items = [
            {"key": "tls.crt", "path": "tls/server-client.crt"},
            {"key": "tls.key", "path": "tls/server-client.key"},
        ]
        sources.append({"secret": {"name": tls.server_cert_secret, "items": items}})
    return sources


def _restart_settings(config: PoolerConfig) -> Obj:
    # Limits change with replicas and observations, the pause with spec.pooler.paused: both
    # reach running pods live, so neither may roll the Deployment.
    data = config.model_dump(mode="json")
    for key in ("default_pool_size", "max_db_connections", "start_paused"):
        data.pop(key)
    for db in data["databases"].values():
        for key in ("pool_size", "max_db_connections"):
            db.pop(key)
    return data


def userlist(facts: Facts) -> str:
    """PgBouncer auth_file text: the server role first, then the client users."""
    users = {facts.username: facts.password}
    if facts.auth_user is not None:
        users.setdefault(*facts.auth_user)  # auth_query logs in with it
    for user, secret in (facts.client_userlist or {}).items():
        users.setdefault(user, secret)  # the server role's real password must win
    return dump_userlist(users)


# -- the objects --------------------------------------------------------------------------
def render_config_map(pgpool: model.PgPool, config: PoolerConfig) -> Obj:
    return _stamped(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(pgpool, config_map_name(pgpool.name)),
            "data": {"pooler.yaml": dump_config(config)},
        }
    )


def _secret(pgpool: model.PgPool, name: str, string_data: dict[str, str]) -> Obj:
    return _stamped(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(pgpool, name),
            "type": "Opaque",
            "stringData": string_data,
        }
    )


def render_auth_secret(pgpool: model.PgPool, facts: Facts) -> Obj:
    return _secret(pgpool, auth_secret_name(pgpool.name), {"userlist.txt": userlist(facts)})


def render_token_secret(pgpool: model.PgPool, facts: Facts) -> Obj:
    return _secret(pgpool, token_secret_name(pgpool.name), {"token": facts.token})


def app_credentials(facts: Facts) -> tuple[str, str]:
    """The user an application connects as: the first client user, else the server role."""
    for user, secret in (facts.client_userlist or {}).items():
        return user, secret
    return facts.username, facts.password


def render_app_secret(pgpool: model.PgPool, facts: Facts) -> Obj:
    host = f"{pgpool.name}.{pgpool.namespace}.svc"
    user, password = app_credentials(facts)
    dbname = pgpool.spec.database.dbname
    port = pgpool.spec.service.port  # what applications reach through the Service
    uri = f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(dbname, safe='')}"
    data = {"host": host, "port": str(port), "dbname": dbname, "username": user, "password": password}
    if pgpool.spec.tls.client_cert_secret:
        # The poolers refuse applications without TLS.
        uri += "?sslmode=require"
        data["sslmode"] = "require"
    return _secret(pgpool, app_secret_name(pgpool.name), {**data, "uri": uri})


def render_service(pgpool: model.PgPool) -> Obj:
    svc = pgpool.spec.service
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pgpool, pgpool.name, svc.annotations),
        "spec": {
            "type": svc.type.value,
            "selector": selector_labels(pgpool.name),
            "ports": [{"name": "postgres", "port": POSTGRES_PORT, "targetPort": "postgres", "protocol": "TCP"}],
        },
    }
    templates.apply_service(service, svc)
    return _stamped(service)


def _default_spread(name: str) -> list[Obj]:
    # Best effort: losing a node should not take the whole fleet, but a small cluster
    # must still be able to schedule every replica.
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(name)},
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def _http_probe(path: str, period: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def render_deployment(pgpool: model.PgPool, facts: Facts, config: PoolerConfig) -> Obj:
    spec = pgpool.spec
    pod = spec.pod
    name = pgpool.name
    restart_hash = spec_hash({"config": _restart_settings(config), "userlist": userlist(facts)})
    resources: Obj = {"requests": dict(pod.resources.requests)}
    if pod.resources.limits:
        resources["limits"] = dict(pod.resources.limits)
    container: Obj = {
        "name": "pooler",
        "image": spec.image or facts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["pgfleet-pooler", "--config", CONFIG_FILE],
        "ports": [
            {"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        # Readiness turns false as soon as a drain starts, so the Service stops sending
        # new clients to a pod that is shutting down.
        "readinessProbe": _http_probe("/readyz", period=5, failures=2),
        "livenessProbe": _http_probe("/healthz", period=10, failures=3),
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": math.ceil(spec.pooler.shutdown_timeout) + GRACE_MARGIN_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": POOLER_UID,
            "runAsGroup": POOLER_UID,
            "fsGroup": POOLER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "topologySpreadConstraints": (
            pod.topology_spread_constraints if pod.topology_spread_constraints is not None else _default_spread(name)
        ),
        "volumes": [
            {
                "name": "config",
                "projected": {
                    "defaultMode": 0o440,
                    "sources": [
                        {
                            "configMap": {
                                "name": config_map_name(name),
                                "items": [{"key": "pooler.yaml", "path": "pooler.yaml"}],
                            }
                        },
                        {
                            "secret": {
                                "name": auth_secret_name(name),
                                "items": [{"key": "userlist.txt", "path": "userlist.txt"}],
                            }
                        },
                        {"secret": {"name": token_secret_name(name), "items": [{"key": "token", "path": "token"}]}},
                        *_tls_sources(spec.tls),
                    ],
                },
            },
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        ],
    }
    templates.apply_pod(pod_spec, pod)
    if pod.affinity:
        pod_spec["affinity"] = pod.affinity
    if pod.tolerations:
        pod_spec["tolerations"] = pod.tolerations
    if pod.node_selector:
        pod_spec["nodeSelector"] = pod.node_selector
    if pod.priority_class_name:
        pod_spec["priorityClassName"] = pod.priority_class_name
    replicas = spec.replicas
    if facts.replicas_cap is not None:
        replicas = min(replicas, facts.replicas_cap)
    return _stamped(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(pgpool, name),
            "spec": {
                "replicas": replicas,
                "revisionHistoryLimit": 3,
                "selector": {"matchLabels": selector_labels(name)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {
                        "maxSurge": spec.rollout.max_surge,
                        "maxUnavailable": spec.rollout.max_unavailable,
                    },
                },
                "template": {
                    "metadata": {
                        "labels": {**pod.labels, **common_labels(name)},
                        "annotations": {**pod.annotations, CONFIG_HASH: restart_hash},
                    },
                    "spec": pod_spec,
                },
            },
        }
    )


def render_pdb(pgpool: model.PgPool) -> Obj | None:
    if pgpool.spec.replicas <= 1:
        return None  # a PDB over one pod would block every node drain
    return _stamped(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(pgpool, pgpool.name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(pgpool.name)}},
        }
    )


def render(pgpool: model.PgPool, facts: Facts) -> Children:
    config = pooler_config(pgpool, facts)
    return Children(
        config_map=render_config_map(pgpool, config),
        auth_secret=render_auth_secret(pgpool, facts),
        token_secret=render_token_secret(pgpool, facts),
        app_secret=render_app_secret(pgpool, facts),
        service=render_service(pgpool),
        deployment=render_deployment(pgpool, facts, config),
        pdb=render_pdb(pgpool),
    )


# For the other render modules (monitoring.py): the same metadata and hash stamp as ours.
child_meta = _meta
stamped = _stamped
