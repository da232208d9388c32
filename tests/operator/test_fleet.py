"""Pushing pool limits to running pooler pods over their HTTP control port."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pgfleet.operator.fleet import PodClient, pod_url, running_pod_addresses


def pod(name: str, ip: str | None, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, **({"podIP": ip} if ip else {})}}


def test_only_running_pods_with_an_address() -> None:
    pods = [
        pod("a", "10.0.0.1"),
        pod("b", None, "Pending"),
        pod("c", "10.0.0.3", "Succeeded"),
        pod("d", "10.0.0.4", deleting=True),
    ]
    assert running_pod_addresses(pods) == {"a": "10.0.0.1"}
    # The budget counts a terminating pod until its containers exit: it drains what it holds.
    assert running_pod_addresses(pods, terminating=True) == {"a": "10.0.0.1", "d": "10.0.0.4"}


async def test_a_push_sends_every_limit_with_the_token_and_reads_the_pod_back(unused_tcp_port: int) -> None:
    received: list[Any] = []
    in_force = {"default_pool_size": 2, "max_db_connections": 2, "databases": {"app": {"pool_size": 2}}}

    async def limits(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok":
            return web.Response(status=401, text="bad token")
        body = json.loads(await request.text())
        received.append(body)
        in_force.update(default_pool_size=body["default_pool_size"], max_db_connections=body["max_db_connections"])
        in_force["databases"] = body["databases"]
        return web.json_response({"ok": True})

    async def status(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok":
            return web.Response(status=401, text="bad token")
        return web.json_response({"clients": 7, "servers": 2, "backend_pids": [11, 12], "limits": in_force})

    app = web.Application()
    app.router.add_put("/limits", limits)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    url = pod_url("127.0.0.1", unused_tcp_port)
    client = PodClient("tok", timeout=2)
    try:
        before = await client.status("p1", url)
        assert (before.reachable, before.limit, before.clients, before.held) == (True, 2, 7, 2)
        assert before.pids == {11, 12} and before.databases == ("app",)
        after = await client.push(before, 5)
        # Every limit the ConfigMap sets, max_db_connections included (the pod's hard cap).
        assert received == [
            {
                "default_pool_size": 5,
                "max_db_connections": 5,
                "databases": {"app": {"pool_size": 5, "max_db_connections": 5}},
            }
        ]
        assert after.reachable and after.limit == 5  # confirmed: in force, as /status says
        stranger = PodClient("wrong", timeout=2)
        refused = await stranger.status("p1", url)
        await stranger.close()
        assert not refused.reachable and refused.error == "HTTP 401"
    finally:
        await client.close()
        await runner.cleanup()


async def test_an_unreachable_pod_is_reported(unused_tcp_port: int) -> None:
    client = PodClient("t", timeout=1)
    try:
        report = await client.status("gone", pod_url("127.0.0.1", unused_tcp_port))
    finally:
        await client.close()
    assert not report.reachable and report.error and report.limit is None  # unknown, not zero
