"""Pushing pool limits to running pooler pods over their HTTP control port."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from aiohttp import web
from pgfleet.operator.fleet import PodClient, PodReport, pod_url, push_in_safe_order, running_pod_addresses


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


# -- the safe order, as data: pods whose control port answers as told -------------------------------


class Pods:
    """Pods' control ports as PodClient.push sees them: each push recorded in order; a pod in
    `deaf` does not take its new limit, one in `busy` keeps holding that many servers."""

    def __init__(self, deaf: set[str] = frozenset(), busy: dict[str, int] | None = None) -> None:  # type: ignore[assignment]
        self.pushed: list[tuple[str, int]] = []
        self.deaf = deaf
        self.busy = busy or {}

    async def push(self, report: PodReport, limit: int) -> PodReport:
        self.pushed.append((report.name, limit))
        if report.name in self.deaf:
            return report
        return replace(report, limit=limit, held=max(self.busy.get(report.name, 0), min(report.held, limit)))


def reports(**pods: tuple[int, int]) -> dict[str, PodReport]:
    """name=(limit in force, servers held)."""
    return {n: PodReport(n, f"http://{n}", reachable=True, limit=lim, held=held) for n, (lim, held) in pods.items()}


async def test_lowering_comes_first_and_a_raise_only_after_every_lowered_pod_confirms() -> None:
    pods = Pods()
    out = await push_in_safe_order(
        pods,
        reports(a=(10, 10), b=(4, 4)),
        {"a": 6, "b": 8},
        budget=14,
        confirmed={},  # type: ignore[arg-type]
    )
    assert pods.pushed == [("a", 6), ("b", 8)]
    assert (out.lowered, out.raised, out.unconfirmed) == (["a"], ["b"], {})
    # A lowered pod that does not confirm: nothing is raised this period.
    pods = Pods(deaf={"a"})
    confirmed: dict[str, int] = {}
    out = await push_in_safe_order(
        pods,
        reports(a=(10, 10), b=(4, 4)),
        {"a": 6, "b": 8},
        budget=14,
        confirmed=confirmed,  # type: ignore[arg-type]
    )
    assert pods.pushed == [("a", 6)] and out.held_back == {"b": 8} and "a" in out.unconfirmed
    assert confirmed == {"a": 10, "b": 4}  # it counts at the limit it last confirmed


async def test_a_raise_goes_only_into_room_that_is_free_now() -> None:
    # a is lowered to 6 but still holds 9 busy servers (they close as their transactions end):
    # b may grow only to 14 - 9.
    pods = Pods(busy={"a": 9})
    out = await push_in_safe_order(
        pods,
        reports(a=(10, 10), b=(4, 4)),
        {"a": 6, "b": 8},
        budget=14,
        confirmed={},  # type: ignore[arg-type]
    )
    assert pods.pushed == [("a", 6), ("b", 5)] and out.held_back == {"b": 8}
    # An unreachable pod counts at the limit it last confirmed, never at zero.
    gone = {**reports(b=(4, 4)), "c": PodReport("c", "http://c", reachable=False, error="timed out")}
    pods = Pods()
    out = await push_in_safe_order(pods, gone, {"b": 12}, budget=14, confirmed={"c": 7})  # type: ignore[arg-type]
    assert pods.pushed == [("b", 7)] and out.held_back == {"b": 12}
    # Room for several raises is handed out once, the largest raise first.
    pods = Pods()
    out = await push_in_safe_order(
        pods,
        reports(a=(2, 2), b=(3, 3)),
        {"a": 8, "b": 6},
        budget=12,
        confirmed={},  # type: ignore[arg-type]
    )
    assert pods.pushed == [("a", 8), ("b", 4)] and out.held_back == {"b": 6}
