"""Fixtures for the operator tests: example objects, the emulated API server, a running operator."""

from __future__ import annotations

import os

from pgfleet.devtools.procs import free_port

# The handlers module reads its settings once, when it is first imported: make the
# operator's intervals short before anything imports it.
os.environ.setdefault("PGFLEET_RECONCILE_INTERVAL", "0.3")
os.environ.setdefault("PGFLEET_PUSH_TIMEOUT", "1")
os.environ.setdefault("PGFLEET_PROBE_TIMEOUT", "2")
os.environ.setdefault("PGFLEET_POOLER_IMAGE", "pgfleet:test")
os.environ.setdefault("PGFLEET_BUDGET_PERIOD", "0.5")
# Pods are pooler processes on 127.0.0.2, .3, ...: one control port for all, free here.
os.environ.setdefault("PGFLEET_POD_HTTP_PORT", str(free_port()))
# The operator's own /metrics, on loopback and a free port.
os.environ.setdefault("PGFLEET_OPERATOR_METRICS_ADDR", "127.0.0.1")
os.environ.setdefault("PGFLEET_OPERATOR_METRICS_PORT", str(free_port()))

import contextlib
import copy
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def pgpool_body(**spec_overrides: Any) -> dict[str, Any]:
    """A PgPool as the API server would hold it (with metadata the server assigns)."""
    spec: dict[str, Any] = {
        "database": {"host": "db.example", "port": 5432, "dbname": "app", "credentialsSecret": "app-db"},
        "replicas": 3,
        "budget": {"maxBackends": 40, "reserve": 4},
    }
    spec.update(copy.deepcopy(spec_overrides))
    return {
        "apiVersion": "pgfleet.io/v1alpha1",
        "kind": "PgPool",
        "metadata": {"name": "main", "namespace": "shop", "uid": "1234-uid", "generation": 1},
        "spec": spec,
    }


@pytest.fixture()
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    def write(server: str) -> Path:
        path = tmp_path / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "clusters": [{"name": "test", "cluster": {"server": server}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(path))
        return path

    return write


@pytest.fixture()
async def api() -> AsyncIterator[Any]:
    """The emulated Kubernetes API with the built-in kinds and the PgPool CRD's resource."""
    import kmock

    from .emulator import FakeKubernetes

    async with FakeKubernetes() as emulator, kmock.Server(emulator):
        with warnings.catch_warnings():
            # kmock 0.8 reads its bundled resource list with a deprecated importlib call.
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        emulator.resources["pgfleet.io/v1alpha1/pgpools"] = kmock.ResourceInfo(
            kind="PgPool",
            singular="pgpool",
            namespaced=True,
            shortnames={"pgp"},
            categories={"pgfleet"},
            subresources={"status", "scale"},
            verbs={"list", "watch", "get", "create", "patch", "update", "delete"},
        )
        emulator.token = "test-token"  # what the `kubeconfig` fixture's user presents
        # The scale subresource as the committed CRD maps it (kubectl scale, an HPA).
        crd = yaml.safe_load((REPO / "crds" / "pgpool.yaml").read_text())
        emulator.scale_paths["pgfleet.io/v1alpha1/pgpools"] = crd["spec"]["versions"][0]["subresources"]["scale"]
        yield emulator


async def eventually(check: Any, *, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check()` until it returns something truthy; fail with `what` after `timeout` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def postgres() -> Any:
    from pgfleet.devtools.tempdb import TempPostgres

    with TempPostgres(max_connections=50) as pg:
        yield pg


# hostssl only: a connection in the clear finds no pg_hba.conf entry; certuser must show a
# client certificate whose CN is its name (pg_hba `cert`).
TLS_HBA = [
    "hostssl all certuser 127.0.0.1/32 cert",
    "hostssl all all 127.0.0.1/32 scram-sha-256",
]


@pytest.fixture(scope="session")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A PostgreSQL that refuses the clear, and the run's certificates (its CA: `certs.ca_file`)."""
    from pgfleet.devtools.certs import Certs
    from pgfleet.devtools.tempdb import TempPostgres

    certs = Certs(tmp_path_factory.mktemp("certs"))
    pg = TempPostgres(max_connections=50, tls=certs.postgres_tls(), hba=TLS_HBA)
    try:
        pg.start()
        pg.sql("CREATE ROLE certuser LOGIN")
        yield pg, certs
    finally:
        pg.cleanup()


@pytest.fixture(scope="session")
def labdb() -> Any:
    """A PostgreSQL of the budget tests' own: max_connections 50 (47 usable), roles fleet and other."""
    from pgfleet.devtools.fleetlab import lab_database

    pg = lab_database(max_connections=50)
    try:
        yield pg
    finally:
        pg.cleanup()


@contextlib.asynccontextmanager
async def running_operator(api: Any) -> AsyncIterator[Any]:
    """The real operator (kopf CLI in a thread) with the credentials $KUBECONFIG names."""
    import asyncio
    import gc

    from kopf.testing import KopfRunner

    runner = KopfRunner(["run", "--standalone", "-A", "-m", "pgfleet.operator.handlers"], timeout=30)
    runner.__enter__()
    try:
        await eventually(lambda: api.seen("watch", "pgfleet.io/v1alpha1/pgpools"), what="the operator's PgPool watch")
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        # Whatever the operator left unclosed is found now and fails this test, not a later one.
        gc.collect()
    assert runner.exception is None, runner.output


@pytest.fixture()
async def operator(api: Any, kubeconfig: Any) -> AsyncIterator[Any]:
    """The real operator talking to the emulated API server with a token kubeconfig."""
    kubeconfig(str(api.url))
    async with running_operator(api) as runner:
        yield runner


# -- real poolers standing in for pods ---------------------------------------------------------------
POD_IPS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="module")
def pods_db() -> Any:
    """A PostgreSQL with the fleet's role `fleet` (devtools.fleetlab) for one module's tests with
    pods: their backends never mix with another module's in pg_stat_activity."""
    from pgfleet.devtools.fleetlab import lab_database

    pg = lab_database(max_connections=50)
    try:
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def lab_pods(pods_db: Any, tmp_path: Path) -> Any:
    """Two real poolers whose control ports listen on 127.0.0.2 and 127.0.0.3 at the operator's
    pod port (the second with two workers); Pod objects with those podIPs stand for them."""
    from pgfleet.devtools.fleetlab import start_fleet_pooler

    port = int(os.environ["PGFLEET_POD_HTTP_PORT"])
    started = [
        start_fleet_pooler(pods_db, tmp_path, f"pod{i}", workers=workers, http_addr=ip, http_port=port, floor=2)
        for i, (ip, workers) in enumerate(zip(POD_IPS, (1, 2), strict=True))
    ]
    yield started
    for pooler in started:
        pooler.stop()


def pod_object(name: str, ip: str, namespace: str = "shop", pgpool: str = "main") -> dict[str, Any]:
    from pgfleet.operator import render

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": render.selector_labels(pgpool)},
        "status": {"phase": "Running", "podIP": ip},
    }


async def fleet_objects(api: Any, namespace: str = "shop") -> None:
    """The Pods (main-a, main-b), the fleet role's credentials and the control-port token of PgPool `main`."""
    from pgfleet.devtools.fleetlab import FLEET_ROLE, TOKEN

    for name, ip in zip(("main-a", "main-b"), POD_IPS, strict=True):
        await api.put_object("/v1/pods", pod_object(name, ip, namespace))
    for name, data in (("db-creds", {"username": FLEET_ROLE, "password": "unused"}), ("main-token", {"token": TOKEN})):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}}
        await api.put_object("/v1/secrets", {**secret, "stringData": data})


def lab_pgpool(pods_db: Any, **spec: Any) -> dict[str, Any]:
    """PgPool `main` (namespace shop) for the lab pods: `app` on `pods_db` with the credentials
    fleet_objects writes, 2 replicas, 20 backends; `spec` adds or replaces top-level fields."""
    database = {"host": pods_db.host, "port": pods_db.port, "dbname": "app", "credentialsSecret": "db-creds"}
    return {
        "apiVersion": "pgfleet.io/v1alpha1",
        "kind": "PgPool",
        "metadata": {"name": "main", "namespace": "shop"},
        "spec": {"database": database, "replicas": 2, "budget": {"maxBackends": 20}, **spec},
    }


def condition_now(api: Any, type_: str, reason: str, message: str = "") -> dict[str, Any] | None:
    """PgPool `main`'s condition `type_` if its reason is `reason` and its message starts with
    `message`, else None (for `eventually`)."""
    obj = api.get("pgfleet.io/v1alpha1/pgpools", "shop", "main") or {}
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == type_ and cond["reason"] == reason and cond["message"].startswith(message):
            return dict(cond)
    return None
