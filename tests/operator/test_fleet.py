"""Pushing pool limits to running pooler pods over their HTTP control port."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pgfleet.operator.fleet import push_limits, running_pod_addresses


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


async def test_push_sends_the_limits_with_the_token(unused_tcp_port: int) -> None:
    received: list[tuple[str | None, Any]] = []

    async def limits(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok":
            return web.Response(status=401, text="bad token")
        received.append((request.headers.get("Authorization"), json.loads(await request.text())))
        return web.json_response({"ok": True})

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"clients": 7, "servers": 2})

    app = web.Application()
    app.router.add_put("/limits", limits)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        body = {"default_pool_size": 5, "databases": {"app": {"pool_size": 5}}}
        result = await push_limits({"p1": "127.0.0.1"}, body, "tok", port=unused_tcp_port)
        assert result.pushed == ["p1"] and result.failed == {}
        assert received == [("Bearer tok", body)]
        assert result.clients == {"p1": 7} and result.total_clients == 7

        refused = await push_limits({"p1": "127.0.0.1"}, body, "wrong", port=unused_tcp_port)
        assert refused.failed == {"p1": "HTTP 401: bad token"}
    finally:
        await runner.cleanup()


async def test_unreachable_pod_is_reported(unused_tcp_port: int) -> None:
    result = await push_limits({"gone": "127.0.0.1"}, {"default_pool_size": 1}, "t", port=unused_tcp_port, timeout=1)
    assert list(result.failed) == ["gone"] and result.pushed == []
    assert result.total_clients is None  # unknown, not zero
