"""kopf handlers for PgPool: thin wrappers that run one idempotent reconcile and report it.

Run it with `pgfleet-operator run` (or `kopf run -m pgfleet.operator.handlers`). Children
are owned through ownerReferences, so deleting a PgPool needs no handler and no finalizer:
Kubernetes' garbage collector removes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import start_http_server

from . import metrics, model, reconcile, scaling
from .control import BudgetLoops, PeriodReport
from .kube import Credentials, KubeClient, object_path
from .observe import AsyncpgProbe, DatabaseProbe
from .settings import DEFAULT_IMAGE, OperatorSettings

SETTINGS = OperatorSettings.from_env()
RESOURCE = (model.GROUP, model.VERSION, model.PLURAL)
ANNOTATION_PREFIX = "pgfleet.io"


class _Runtime:
    """What the handlers share within one run of the operator (one event loop)."""

    credentials: Credentials | None = None
    client: KubeClient | None = None
    probe: DatabaseProbe = AsyncpgProbe()
    pooler_image: str | None = None
    loops: BudgetLoops | None = None  # one budget loop per database server
    metrics: WSGIServer | None = None  # the /metrics server (a thread), when its port is set
    # Reconciles running now. kopf runs the cleanup while timers it gave up waiting for still
    # run, so the cleanup stops these itself before it closes what they use.
    working: set[asyncio.Task[Any]] = set()


# How long the cleanup lets running reconciles finish before it cancels them (a reconcile
# is idempotent: the next operator redoes what a cancelled one left undone).
SHUTDOWN_GRACE = 5.0


runtime = _Runtime()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    runtime.client = None
    runtime.credentials = None
    runtime.working = set()
    runtime.probe = AsyncpgProbe(timeout=SETTINGS.probe_timeout)
    runtime.loops = BudgetLoops(
        period=SETTINGS.budget_period, push_timeout=SETTINGS.push_timeout, probe_timeout=SETTINGS.probe_timeout
    )
    if SETTINGS.metrics_port and runtime.metrics is None:
        registry = metrics.make_registry(_reports)
        runtime.metrics, _thread = start_http_server(SETTINGS.metrics_port, SETTINGS.metrics_addr, registry)
    # Our own annotation prefix: kopf's bookkeeping is visibly ours and cannot collide
    # with another kopf operator watching the same objects.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    # Watches that end and restart regularly survive silent network drops.
    settings.watching.server_timeout = int(SETTINGS.watch_server_timeout)
    settings.watching.client_timeout = int(SETTINGS.watch_client_timeout)
    settings.watching.connect_timeout = 30
    # Only Warnings become Events by themselves; our own Events are posted explicitly.
    settings.posting.level = logging.WARNING


def _reports() -> list[tuple[str, PeriodReport]]:
    loops = runtime.loops
    return loops.reports() if loops is not None else []


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config, any credential form.

    kopf calls this again when the API answers 401 or the exec plugin's token expires, so a
    fresh load (which runs the plugin again) is what it needs then. The operator's own client,
    once made, renews its credentials by itself (see `kube.Credentials`).
    """
    credentials = await Credentials.load()
    info = await credentials.login()
    scheme, _space, token = (info.authorization or "").partition(" ")
    runtime.credentials = credentials
    return kopf.ConnectionInfo(
        server=info.server,
        ca_path=info.ca_path,
        insecure=info.insecure,
        scheme=scheme or None,
        token=token or None,
        certificate_path=info.certificate_path,
        private_key_path=info.private_key_path,
        default_namespace=info.namespace,
        expiration=info.expiration,
    )


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    await _stop_reconciles(SHUTDOWN_GRACE)
    if runtime.loops is not None:
        await runtime.loops.close()
        runtime.loops = None
    if runtime.client is not None:
        await runtime.client.close()
        runtime.client = None
    if runtime.metrics is not None:
        # Last: stopping the server waits for its thread's next poll (up to half a second).
        server, runtime.metrics = runtime.metrics, None
        await asyncio.to_thread(server.shutdown)
        server.server_close()


async def _stop_reconciles(grace: float) -> None:
    """Let running reconciles finish for `grace` seconds, then cancel them and wait."""
    running = set(runtime.working)
    if running:
        _done, pending = await asyncio.wait(running, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _client() -> KubeClient:
    if runtime.client is None:
        credentials = runtime.credentials
        if credentials is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        runtime.client = KubeClient(credentials)
    return runtime.client


async def _pooler_image(client: KubeClient) -> str:
    """The image for pooler pods: configured, else the operator's own, else the default."""
    if runtime.pooler_image is None:
        image = SETTINGS.pooler_image
        pod_name, pod_namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        if image is None and pod_name and pod_namespace:
            pod = await client.get(object_path("v1", "Pod", pod_namespace, pod_name)) or {}
            containers = pod.get("spec", {}).get("containers") or []
            image = next((c.get("image") for c in containers if c.get("name") == "operator"), None)
        runtime.pooler_image = image or DEFAULT_IMAGE
    return runtime.pooler_image


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    # Change handlers and the timer run concurrently; one reconcile at a time per PgPool.
    lock = memo.get("lock")
    if not isinstance(lock, asyncio.Lock):
        lock = memo["lock"] = asyncio.Lock()
    return lock


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger) -> None:
    task = asyncio.current_task()
    assert task is not None  # kopf runs handlers in tasks
    runtime.working.add(task)
    try:
        await _reconcile_now(body, patch, memo, logger)
    finally:
        runtime.working.discard(task)


async def _reconcile_now(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger) -> None:
    client = _client()
    ctx = reconcile.Context(
        client=client,
        probe=runtime.probe,
        pooler_image=await _pooler_image(client),
        push_timeout=SETTINGS.push_timeout,
        loops=runtime.loops,
        pod_http_port=SETTINGS.pod_http_port,
    )
    async with _lock(memo):
        outcome = await reconcile.reconcile(ctx, dict(body))
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        logger.warning(f"{event.reason}: {event.message}")
    patch.status.update(outcome.status)


@kopf.on.resume(*RESOURCE, id="reconcile")
@kopf.on.create(*RESOURCE, id="reconcile")
@kopf.on.update(*RESOURCE, id="reconcile")
async def on_change(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await _reconcile(body, patch, memo, logger)


@kopf.on.delete(*RESOURCE, id="forget-budget", optional=True)  # optional: no finalizer
async def on_delete(body: kopf.Body, **_: Any) -> None:
    """The PgPool is gone: its fleet leaves its server's budget loop (the loop ends with the last)."""
    if runtime.loops is not None:
        runtime.loops.unregister(f"{body.metadata.namespace}/{body.metadata.name}")
    scaling.forget(str(body.metadata.uid))


def _reconciled_once(status: kopf.Status, **_: Any) -> bool:
    # Until a change handler has run, the timer has nothing to refresh (see KUBERNETES_TESTING.md).
    return status.get("observedGeneration") is not None


@kopf.timer(*RESOURCE, id="budget", interval=SETTINGS.budget_period, when=_reconciled_once)
async def budget(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """status.budget and BudgetEnforced as the budget loop sees it, every period (no API reads)."""
    loops = runtime.loops
    lock = _lock(memo)
    if loops is None or lock.locked():
        return  # a reconcile is running: it writes the budget itself, and newer conditions
    async with lock:
        # The body is kopf's live view of the object (timers get one), so the conditions
        # merged here are the latest the watch has delivered.
        outcome = reconcile.budget_report(loops, dict(body))
    if outcome is None:
        return
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        logger.warning(f"{event.reason}: {event.message}")
    patch.status.update(outcome.status)


@kopf.timer(*RESOURCE, id="refresh", interval=SETTINGS.reconcile_interval, when=_reconciled_once)
async def refresh(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Pick up what no PgPool change announces: a Secret appearing, the database, pod readiness."""
    await _reconcile(body, patch, memo, logger)
