"""The PgPool resource as pydantic models: what users write (spec) and what we report (status).

These models are the single description of the resource: `crd.py` turns them into the
CRD's OpenAPI schema, and the operator parses every PgPool body with them. Field names
are the CRD's camelCase; Python code uses the snake_case attribute names.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pgfleet.pooler.config import PoolerConfig, PoolMode, SslMode  # the pooler's own modes: one definition
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "pgfleet.io"
VERSION = "v1alpha1"
KIND = "PgPool"
PLURAL = "pgpools"
SINGULAR = "pgpool"
SHORT_NAMES = ["pgp"]
CATEGORIES = ["pgfleet"]

# Kubernetes quantities ("100m", "64Mi", 1) are strings or integers.
Quantity = str | int
Seconds = Annotated[float, Field(ge=0)]


def _rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules (rule, message) for what a structural schema cannot say; crd.py keeps them."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


def _list_rules(*rules: tuple[str, str]) -> Any:
    """The same CEL rules on a list field (they see the list as `self`)."""
    return Field(json_schema_extra=_rules(*rules))


# Lists of named Kubernetes objects (env, volumes, containers) need the name.
_NAMED = ("self.all(x, has(x.name) && x.name != '')", "every entry needs a name")


class _Model(BaseModel):
    # Unknown keys are rejected here as the API server's pruning would drop them: a typo in
    # a spec must never turn into a silently ignored setting.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ClientAuthType(str, Enum):
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"


class ServiceType(str, Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class DatabaseSpec(_Model):
    """The PostgreSQL server the fleet fronts."""

    host: str = Field(min_length=1, description="Host name or address of the PostgreSQL server (e.g. a Service name).")
    port: int = Field(default=5432, ge=1, le=65535, description="PostgreSQL server port.")
    dbname: str = Field(
        min_length=1, description="Database to front; clients connect to the pooler with the same database name."
    )
    credentials_secret: str = Field(
        min_length=1,
        description=(
            "Secret (same namespace) with keys `username` and `password`: the role the poolers log in as, "
            "and that the operator uses to measure the database."
        ),
    )


class AuthQuerySpec(_Model):
    """PgBouncer's auth_query: users are looked up in the database, no password Secret per user."""

    query: str = Field(
        default=str(PoolerConfig.model_fields["auth_query"].default),
        min_length=1,
        description=(
            "Query returning (user name, password hash or SCRAM verifier) for $1, the user name (auth_query). "
            "The default reads pg_shadow, which only a superuser may; for another role, a SECURITY DEFINER "
            "function over pg_shadow, e.g. `SELECT * FROM pgfleet.lookup($1)`."
        ),
    )
    user_secret: str | None = Field(
        default=None,
        description=(
            "Secret (same namespace) with keys `username` and `password`: the role the lookup logs in as "
            "(auth_user). Unset: the credentialsSecret role."
        ),
    )


class ClientAuthSpec(_Model):
    """How applications authenticate to the poolers."""

    auth_type: ClientAuthType = Field(
        default=ClientAuthType.SCRAM_SHA_256, description="Password method the poolers ask clients for."
    )
    userlist_secret: str | None = Field(
        default=None,
        description=(
            "Secret (same namespace) with key `userlist.txt` in PgBouncer's auth_file format "
            '(`"user" "password"` lines). Unset: clients log in as the credentialsSecret user.'
        ),
    )
    auth_query: AuthQuerySpec | None = Field(
        default=None,
        description=(
            "Look users missing from the userlist up in the database (auth_user/auth_query/auth_dbname). Set: "
            "each client logs in to PostgreSQL as its own role (SCRAM pass-through or the md5 hash found), "
            "one pool per role, all within the fleet's budget; unset: every client uses the credentialsSecret role."
        ),
    )


# A client certificate is shown in a TLS handshake: without TLS it would be silently unused.
_CERT_NEEDS_TLS = "tls.serverCertSecret needs a tls.serverSslmode other than disable"


class TlsSpec(_Model):
    """TLS of the poolers, towards applications and towards the database.

    Secrets are mounted read-only; a rotated Secret reaches running pods without a restart
    (the pooler reads the files again when they change).
    """

    model_config = ConfigDict(
        json_schema_extra=_rules(("!has(self.serverCertSecret) || self.serverSslmode != 'disable'", _CERT_NEEDS_TLS))
    )

    client_cert_secret: str | None = Field(
        default=None,
        description=(
            "Secret (same namespace) with `tls.crt` and `tls.key`, the kubernetes.io/tls layout cert-manager "
            "writes: the certificate the poolers show applications. Set: applications must use TLS "
            "(client_tls_sslmode require)."
        ),
    )
    server_ca_secret: str | None = Field(
        default=None,
        description="Secret (same namespace) with `ca.crt`: the CA the database's certificate must chain to.",
    )
    server_sslmode: SslMode = Field(
        default=SslMode.PREFER,
        description=(
            "TLS towards the database: disable, allow, prefer (TLS when offered), require, verify-ca, "
            "verify-full (also checks database.host against the certificate)."
        ),
    )
    server_cert_secret: str | None = Field(
        default=None,
        description=(
            "Secret (same namespace) with `tls.crt` and `tls.key` (the kubernetes.io/tls layout): the client "
            "certificate the poolers and the operator show the database (server_tls_cert_file/key_file), for "
            "pg_hba `cert` or clientcert=verify-full."
        ),
    )

    @model_validator(mode="after")
    def _cert_needs_tls(self) -> TlsSpec:
        # The CEL rule above says the same at admission; this keeps the operator in agreement.
        if self.server_cert_secret and self.server_sslmode is SslMode.DISABLE:
            raise ValueError(_CERT_NEEDS_TLS)
        return self


class RolloutSpec(_Model):
    """Rolling-update bounds; maxSurge counts against the backend budget."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "self.maxSurge > 0 || self.maxUnavailable > 0",
                "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
            ),
        )
    )

    max_surge: int = Field(
        default=1, ge=0, le=10, description="Extra pods a rollout may start; each one gets a share of the budget."
    )
    max_unavailable: int = Field(default=0, ge=0, le=10, description="Pods a rollout may take down before replacing.")


class BudgetSpec(_Model):
    """How many PostgreSQL backends the whole fleet may hold at once."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "has(self.maxBackends) || has(self.maxBackendsPercent)",
                "budget needs maxBackends, maxBackendsPercent or both",
            ),
            (
                "!has(self.maxBackends) || self.reserve < self.maxBackends",
                "budget.reserve must be below budget.maxBackends",
            ),
        )
    )

    max_backends: int | None = Field(default=None, ge=1, description="Absolute backend budget for the fleet.")
    max_backends_percent: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Budget as a percentage of the database's max_connections (the smaller one wins if both are set).",
    )
    reserve: int = Field(default=0, ge=0, description="Backends kept free for others (migrations, admins, jobs).")
    weight: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Share of the database's headroom against other PgPools on the same server (max-min fair).",
    )


# The pooler splits max_client_conn among its workers and refuses a nonzero limit below their count.
_CLIENTS_PER_WORKER = "pooler.maxClientConn must be at least pooler.workers: each worker takes a share of the clients"


class PoolerSpec(_Model):
    """Pooler settings; names and meanings are PgBouncer's."""

    model_config = ConfigDict(json_schema_extra=_rules(("self.maxClientConn >= self.workers", _CLIENTS_PER_WORKER)))

    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Worker processes per pooler pod, sharing its port; match the CPUs the pod gets. Each costs about "
            "55 MB of memory, and every limit (maxClientConn, the pool size) is split among them. "
            "Changing it restarts the pods."
        ),
    )
    max_client_conn: int = Field(default=1000, ge=1, description="Client connections each pooler pod accepts.")
    paused: bool = Field(
        default=False,
        description=(
            "PAUSE every pooler pod (for a primary switchover or a database restart): transactions in flight "
            "finish, new ones wait in the queue (up to queryWaitTimeout), server connections close; false "
            "RESUMEs. The TrafficPaused condition counts the pods paused. Not spec.paused, which stops reconciling."
        ),
    )
    max_prepared_statements: int = Field(
        default=200, ge=0, description="Prepared statements tracked per server connection; 0 disables tracking."
    )
    query_wait_timeout: Seconds = Field(default=120.0, description="Seconds a client may wait for a server.")
    query_timeout: Seconds = Field(default=0.0, description="Cancel queries running longer (seconds, 0 = off).")
    client_idle_timeout: Seconds = Field(default=0.0, description="Close idle clients after (seconds, 0 = off).")
    idle_transaction_timeout: Seconds = Field(
        default=0.0, description="Close clients idle in a transaction after (seconds, 0 = off)."
    )
    server_idle_timeout: Seconds = Field(default=600.0, description="Close unused server connections after (seconds).")
    server_lifetime: Seconds = Field(default=3600.0, description="Close server connections older than (seconds).")
    server_connect_timeout: Seconds = Field(
        default=15.0, description="Give up connecting to the server after (seconds)."
    )
    shutdown_timeout: Seconds = Field(
        default=30.0,
        le=3600,
        description="Longest a pod drains its clients on SIGTERM; the pod's grace period is set above it.",
    )
    ignore_startup_parameters: list[str] = Field(
        default_factory=list, description="Client startup parameters to accept and ignore (e.g. extra_float_digits)."
    )

    @model_validator(mode="after")
    def _clients_per_worker(self) -> PoolerSpec:
        # The CEL rule above says the same at admission; this keeps the operator in agreement.
        if self.max_client_conn < self.workers:
            raise ValueError(_CLIENTS_PER_WORKER)
        return self


def _default_requests() -> dict[str, Quantity]:
    return {"cpu": "100m", "memory": "64Mi"}


class ResourcesSpec(_Model):
    requests: dict[str, Quantity] = Field(
        default_factory=_default_requests, description="Resource requests of a pooler pod."
    )
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits of a pooler pod.")


class PodSpec(_Model):
    """Overrides for the pooler pods."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (core/v1 Affinity).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    topology_spread_constraints: list[dict[str, Any]] | None = Field(
        default=None,
        description="Replaces the default spread (pods spread across nodes, best effort).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    env: Annotated[list[dict[str, Any]], _list_rules(_NAMED)] = Field(
        default_factory=list, description="Extra environment variables of the pooler container (core/v1 EnvVar)."
    )
    volumes: Annotated[
        list[dict[str, Any]],
        _list_rules(
            _NAMED,
            (
                "self.all(v, !has(v.name) || !(v.name in ['config', 'tmp']))",
                "volumes: config and tmp are the pooler's own",
            ),
        ),
    ] = Field(default_factory=list, description="Extra pod volumes (core/v1 Volume), e.g. for a sidecar.")
    volume_mounts: Annotated[
        list[dict[str, Any]],
        _list_rules(
            (
                "self.all(m, has(m.name) && has(m.mountPath))",
                "volumeMounts: every mount needs a name and a mountPath",
            ),
            (
                "self.all(m, !has(m.mountPath) || !(m.mountPath in ['/etc/pgfleet', '/tmp']))",
                "volumeMounts: /etc/pgfleet and /tmp are the pooler's own",
            ),
        ),
    ] = Field(default_factory=list, description="Extra mounts of the pooler container (core/v1 VolumeMount).")
    containers: Annotated[
        list[dict[str, Any]],
        _list_rules(
            _NAMED, ("self.all(c, !has(c.name) || c.name != 'pooler')", "containers: the name pooler is taken")
        ),
    ] = Field(
        default_factory=list,
        description=(
            "Extra containers (sidecars, core/v1 Container); each gets the pooler's restricted securityContext "
            "under its own."
        ),
    )
    security_context: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Pod securityContext merged over the secure defaults (non-root UID 10001, RuntimeDefault seccomp); "
            "what you set wins."
        ),
    )
    container_security_context: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "The pooler container's securityContext merged over the defaults (no privilege escalation, read-only "
            "root filesystem, all capabilities dropped, non-root); what you set wins."
        ),
    )
    service_account_name: str | None = Field(default=None, description="ServiceAccount of the pods.")
    automount_service_account_token: bool = Field(
        default=False, description="Mount the ServiceAccount's token (the pooler needs none; a sidecar may)."
    )


class ExternalTrafficPolicy(str, Enum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class ServiceSpec(_Model):
    """Overrides for the Service applications connect to."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0"
                " || self.type == 'LoadBalancer'",
                "service.loadBalancerSourceRanges needs service.type LoadBalancer",
            ),
            (
                "!has(self.externalTrafficPolicy) || self.type != 'ClusterIP'",
                "service.externalTrafficPolicy needs service.type NodePort or LoadBalancer",
            ),
            (
                "!has(self.nodePort) || self.type != 'ClusterIP'",
                "service.nodePort needs service.type NodePort or LoadBalancer",
            ),
        )
    )

    type: ServiceType = ServiceType.CLUSTER_IP
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict, description="Extra Service labels (ours win on conflict).")
    port: int = Field(
        default=5432, ge=1, le=65535, description="The Service's PostgreSQL port (the pods listen on 5432)."
    )
    node_port: int | None = Field(
        default=None, ge=30000, le=32767, description="Fixed nodePort (NodePort, LoadBalancer)."
    )
    load_balancer_source_ranges: list[str] = Field(
        default_factory=list, description="CIDRs allowed through the cloud load balancer (type LoadBalancer)."
    )
    external_traffic_policy: ExternalTrafficPolicy | None = Field(
        default=None, description="Local keeps client source addresses (NodePort, LoadBalancer)."
    )


class MonitoringSpec(_Model):
    """Monitoring objects for the pods' /metrics (pgbouncer_exporter's names plus pgfleet's own)."""

    pod_monitor: bool = Field(
        default=False,
        description=(
            "Render a Prometheus Operator PodMonitor for the pods' /metrics (only where the cluster serves "
            "monitoring.coreos.com/v1 PodMonitors; the Monitoring condition says why not otherwise)."
        ),
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra PodMonitor labels (e.g. what your Prometheus selects on)."
    )
    interval: str | None = Field(
        default=None,
        pattern=r"^([0-9]+(ms|s|m|h))+$",
        description="Scrape interval (e.g. 30s); Prometheus' default if unset.",
    )


class AutoscalingSpec(_Model):
    """Pods from client load: ceil(clients / targetClientsPerReplica), within bounds and the budget."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
        )
    )

    min_replicas: int = Field(default=1, ge=0, le=100, description="Fewest pooler pods.")
    max_replicas: int = Field(
        ge=1, le=100, description="Most pooler pods (fewer when the budget cannot give each pod its floor)."
    )
    target_clients_per_replica: int = Field(
        ge=1, description="Client connections one pod should carry; the clients are what the pods report."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="Scale down only to the highest count recommended over this many seconds; up is at once.",
    )


class PgPoolSpec(_Model):
    # Each pod that can exist at once needs at least one backend; with an absolute budget
    # that is checked at admission (a percentage budget is checked once max_connections is known).
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                "!has(self.budget.maxBackends)"
                " || self.budget.maxBackends - self.budget.reserve >= self.replicas + self.rollout.maxSurge",
                "budget.maxBackends - budget.reserve must give every pod at least one backend:"
                " it must be at least replicas + rollout.maxSurge",
            ),
        )
    )

    database: DatabaseSpec
    client_auth: ClientAuthSpec = Field(default_factory=ClientAuthSpec)
    tls: TlsSpec = Field(default_factory=TlsSpec)
    pool_mode: PoolMode = Field(default=PoolMode.TRANSACTION, description="When a server connection is given back.")
    replicas: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Pooler pods (the scale subresource sets it; with autoscaling, the operator does).",
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Scale the pods from the clients they report; unset: replicas is the user's."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    budget: BudgetSpec
    pooler: PoolerSpec = Field(default_factory=PoolerSpec)
    image: str | None = Field(default=None, description="Pooler image; defaults to the operator's own image.")
    pod: PodSpec = Field(default_factory=PodSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    paused: bool = Field(default=False, description="Stop reconciling: the operator leaves the children as they are.")


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class ReplicaRecommendation(_Model):
    at: str = Field(description="When (RFC 3339).")
    replicas: int


class AutoscalingStatus(_Model):
    """What the autoscaler saw and decided at the last reconcile."""

    clients: int | None = Field(default=None, description="Client connections the pods reported.")
    desired_replicas: int | None = Field(default=None, description="Replicas the autoscaler set.")
    last_scale_time: str | None = Field(default=None, description="When it last changed replicas.")
    recommendations: list[ReplicaRecommendation] = Field(
        default_factory=list, description="Recommendations within the scale-down window."
    )


class BudgetStatus(_Model):
    """The budget as the budget loop last computed it, and what observation has measured."""

    # Written by the operator alone; fields of older versions (perPod, pods: the even split
    # the loop replaced) are ignored rather than refused.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    total: int | None = Field(
        default=None, description="Backends the fleet may hold now (the budget loop's; reserve taken off)."
    )
    max_connections: int | None = Field(default=None, description="The database's max_connections, last measured.")
    backends_in_use: int | None = Field(default=None, description="Backends of the pooler role on the database.")
    clients: int | None = Field(default=None, description="Client connections across the fleet.")
    fleet_backends: int | None = Field(
        default=None, description="Backends the fleet's pods hold, by the PIDs they report (exact)."
    )
    others: int | None = Field(default=None, description="Client backends on the server that are not any fleet's.")
    usable: int | None = Field(
        default=None, description="max_connections - superuser_reserved_connections - reserved_connections."
    )
    headroom: int | None = Field(
        default=None, description="usable - others - the operator's connection - reserve, shared by the PgPools."
    )
    waiting_clients: int | None = Field(default=None, description="Clients queued in the pods for a backend.")
    per_pod_min: int | None = Field(default=None, description="Smallest pool limit a running pod has now.")
    per_pod_max: int | None = Field(default=None, description="Largest pool limit a running pod has now.")
    observed_at: str | None = Field(default=None, description="When the budget loop last looked at the database.")


class PgPoolStatus(_Model):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    conditions: list[Condition] = Field(default_factory=list)
    budget: BudgetStatus = Field(default_factory=BudgetStatus)
    autoscaling: AutoscalingStatus | None = None
    paused_pods: int | None = Field(
        default=None, description="Pods paused by pooler.paused (no server connection open any more)."
    )


class PgPool(_Model):
    """A whole PgPool object as the operator reads it."""

    model_config = ConfigDict(extra="ignore")

    api_version: str = f"{GROUP}/{VERSION}"
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: PgPoolSpec
    status: PgPoolStatus = Field(default_factory=PgPoolStatus)

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata["namespace"])

    @property
    def generation(self) -> int | None:
        value = self.metadata.get("generation")
        return int(value) if value is not None else None
