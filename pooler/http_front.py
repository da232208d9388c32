"""The HTTP port of a multi-worker pooler: one view and one set of controls over all workers.

The supervisor serves the port users and the operator know (same paths, same token) and
asks each worker's private control socket in turn:
- /status sums the workers' counts per pool, and lists each worker's own status;
- /metrics is every worker's exposition with a `worker` label added, so that sums over
  the pgbouncer_exporter names give the pooler's totals;
- PUT /limits is checked here and then applied by every worker to its own share;
- PUT /pause pauses or resumes every worker (a worker started again meanwhile follows);
- POST /drain drains them all.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from .config import ConfigError
from .http import (
    POOLER_KEY,
    STATUS_COUNTS,
    authorize,
    error_response,
    json_response,
    limits_in_force_config,
    new_app,
    read_limits,
    read_pause,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .supervisor import Supervisor, Worker

log = logging.getLogger("pgfleet.http")

# -- merging what the workers say (pure) -------------------------------------------------------------


def merge_status(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """One /status for the whole pooler from the workers' own (in worker order)."""
    pools: dict[tuple[str, str], dict[str, Any]] = {}
    for status in statuses:
        for pool in status["pools"]:
            key = (pool["database"], pool["user"])
            merged = pools.get(key)
            if merged is None:
                pools[key] = copy.deepcopy(pool)  # the others are added to it
                continue
            merged["paused"] = merged["paused"] or pool["paused"]
            merged["maxwait_seconds"] = max(merged["maxwait_seconds"], pool["maxwait_seconds"])
            merged["backend_pids"] = sorted([*merged.get("backend_pids", []), *pool.get("backend_pids", [])])
            for group in ("clients", "servers", "limits", "totals"):
                _add_into(merged[group], pool[group])
    totals = {key: sum(status["totals"][key] for status in statuses) for key in STATUS_COUNTS}
    return {
        "paused": bool(statuses) and all(status.get("paused", False) for status in statuses),
        "clients": sum(status["clients"] for status in statuses),
        "servers": sum(status["servers"] for status in statuses),
        "backend_pids": sorted(pid for status in statuses for pid in status.get("backend_pids", [])),
        "maxwait_seconds": max((status.get("maxwait_seconds", 0.0) for status in statuses), default=0.0),
        "totals": totals,
        "pools": list(pools.values()),
    }


def _add_into(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


def label_families(texts: Iterable[tuple[int, str]]) -> list[Metric]:
    """Each worker's exposition (index, text) parsed, its samples labelled worker="<index>"."""
    families: dict[str, Metric] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            labelled = [sample._replace(labels={**sample.labels, "worker": str(index)}) for sample in family.samples]
            merged = families.setdefault(family.name, family)
            if merged is family:
                family.samples = labelled
            else:
                merged.samples.extend(labelled)
    return list(families.values())


class FamiliesCollector(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


# -- handlers ---------------------------------------------------------------------------------------


def _supervisor(request: web.Request) -> Supervisor:
    return request.app[POOLER_KEY]  # type: ignore[no-any-return]


async def _ask_all(supervisor: Supervisor, path: str) -> list[tuple[Worker, int, Any]]:
    async def ask(worker: Worker) -> tuple[Worker, int, Any]:
        try:
            status, body = await worker.request("GET", path)
        except (aiohttp.ClientError, OSError) as exc:
            return worker, 503, {"error": f"worker unreachable: {exc}"}
        return worker, status, body

    return list(await asyncio.gather(*(ask(worker) for worker in supervisor.workers)))


async def handle_healthz(request: web.Request) -> web.Response:
    down = [worker.slot.index for worker in _supervisor(request).workers if not worker.alive]
    if down:
        return json_response({"status": "degraded", "workers_down": down}, 503)
    return json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    supervisor = _supervisor(request)
    if supervisor.draining or supervisor.stopping:
        return json_response({"ready": False, "reason": "draining"}, 503)
    answers = await _ask_all(supervisor, "/readyz")
    not_ready = [worker.slot.index for worker, status, _ in answers if status != 200]
    if not_ready:
        return json_response({"ready": False, "reason": "workers not ready", "workers": not_ready}, 503)
    return json_response({"ready": True})


async def handle_status(request: web.Request) -> web.Response:
    supervisor = _supervisor(request)
    answers = await _ask_all(supervisor, "/status")
    statuses = [body for _, status, body in answers if status == 200]
    merged = merge_status(statuses)
    now = supervisor.loop.time()
    body = {
        "ready": not supervisor.draining and len(statuses) == len(answers),
        "draining": supervisor.draining,
        "uptime_seconds": round(now - supervisor.started_at, 3),
        **merged,
        "limits": limits_in_force_config(supervisor.config),
        "workers": [
            {"index": worker.slot.index, "restarts": worker.restarts, "status": body if status == 200 else None}
            for worker, status, body in answers
        ],
    }
    return json_response(body)


async def handle_metrics(request: web.Request) -> web.Response:
    answers = await _ask_all(_supervisor(request), "/metrics")
    texts = [(worker.slot.index, body) for worker, status, body in answers if status == 200]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(label_families(texts)))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_put_limits(request: web.Request) -> web.Response:
    changes = await read_limits(request)
    if isinstance(changes, web.Response):
        return changes
    supervisor = _supervisor(request)
    try:
        results = await supervisor.set_limits(changes)
    except ConfigError as exc:
        return error_response(400, str(exc))
    log.info("PUT /limits from %s: %s", request.remote, json.dumps(changes, sort_keys=True))
    failed = {str(index): reply for index, status, reply in results if status != 200}
    reply = {**limits_in_force_config(supervisor.config), "workers": [result[2] for result in results]}
    if failed:
        return json_response({**reply, "error": "some workers did not apply the limits", "failed": failed}, 502)
    return json_response(reply)


async def handle_put_pause(request: web.Request) -> web.Response:
    wanted = await read_pause(request)
    if isinstance(wanted, web.Response):
        return wanted
    supervisor = _supervisor(request)
    if not wanted and supervisor.draining:
        return error_response(409, "the pooler is shutting down; it stays paused")
    log.info("PUT /pause from %s: %s", request.remote, "PAUSE" if wanted else "RESUME")
    results = await supervisor.set_paused(wanted)
    replies = [reply for _, status, reply in results if status == 200]
    reply = {
        "paused": len(replies) == len(results) and all(r.get("paused") for r in replies),
        "servers": sum(int(r.get("servers", 0)) for r in replies),
        "workers": [result[2] for result in results],
    }
    failed = {str(index): body for index, status, body in results if status != 200}
    if failed:
        return json_response({**reply, "error": "some workers did not take the change", "failed": failed}, 502)
    return json_response(reply)


async def handle_drain(request: web.Request) -> web.Response:
    refused = authorize(request)
    if refused is not None:
        return refused
    supervisor = _supervisor(request)
    log.info("POST /drain from %s", request.remote)
    supervisor.drain()
    return json_response({"draining": True}, 202)


def build_front(supervisor: Supervisor) -> web.Application:
    # `authorize` reads the token file from the supervisor's config, as from a pooler's.
    return new_app(
        supervisor,
        metrics=handle_metrics,
        healthz=handle_healthz,
        readyz=handle_readyz,
        status=handle_status,
        put_limits=handle_put_limits,
        put_pause=handle_put_pause,
        drain=handle_drain,
    )


async def start_front(supervisor: Supervisor) -> web.AppRunner:
    """Serve the HTTP port for all workers; the caller owns the runner."""
    config = supervisor.config
    runner = web.AppRunner(build_front(supervisor), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.http_listen_addr, config.http_listen_port).start()
    if not config.http_token_file:
        log.warning("http_token_file is not set: PUT /limits, PUT /pause and POST /drain are refused (403)")
    log.info("HTTP control port on %s (for %d workers)", ", ".join(map(str, runner.addresses)), len(supervisor.workers))
    return runner
