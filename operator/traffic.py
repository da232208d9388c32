"""`spec.pooler.paused`: every pod PAUSEs (or RESUMEs) through its control port, and the status says how far.

PAUSE is the pooler's own (PUT /pause): transactions in flight finish, new ones wait in the
queue, server connections close as they come back. It is how a primary switchover or a
database restart goes by without failed transactions. Distinct from `spec.paused`, which
stops the operator from reconciling at all.

The desired state is pushed to every running pod at each reconcile (idempotent), so a pod
that starts during a pause is paused at the next one. A pod counts as paused once it says
so and holds no server connection any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from .fleet import pod_url

TRAFFIC_PAUSED = "TrafficPaused"
# Progress, not trouble: these never become Warning Events.
QUIET_REASONS = ("Pausing", "Serving", "Resuming")


@dataclass(frozen=True, slots=True)
class PauseReport:
    wanted: bool
    servers: dict[str, int] = field(default_factory=dict)  # pod -> server connections still open
    paused: dict[str, bool] = field(default_factory=dict)  # pod -> says it is paused
    failed: dict[str, str] = field(default_factory=dict)  # pod -> why it did not take the change

    @property
    def pods(self) -> int:
        return len(self.servers) + len(self.failed)

    @property
    def fully_paused(self) -> list[str]:
        return sorted(pod for pod, servers in self.servers.items() if self.paused.get(pod) and servers == 0)


async def push_pause(
    addresses: Mapping[str, str], paused: bool, token: str, *, port: int, timeout: float = 5.0
) -> PauseReport:
    """PUT /pause {"paused": ...} to every pod (name -> IP) at once."""
    report = PauseReport(wanted=paused)
    if not addresses:
        return report
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), headers=headers) as session:

        async def one(name: str, ip: str) -> None:
            try:
                async with session.put(f"{pod_url(ip, port)}/pause", json={"paused": paused}) as response:
                    if response.status != 200:
                        report.failed[name] = f"HTTP {response.status}: {(await response.text())[:200]}"
                        return
                    body = await response.json()
                report.paused[name] = bool(body["paused"])
                report.servers[name] = int(body["servers"])
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
                report.failed[name] = str(exc) or type(exc).__name__

        await asyncio.gather(*(one(name, ip) for name, ip in sorted(addresses.items())))
    return report


def describe(report: PauseReport) -> tuple[bool, str, str]:
    """(status, reason, message) of the TrafficPaused condition."""
    failed = "; ".join(f"{pod}: {why}" for pod, why in sorted(report.failed.items()))
    if not report.wanted:
        still = sorted(pod for pod, paused in report.paused.items() if paused)
        if report.failed:
            return False, "ResumeNotPushed", f"pooler.paused is false, but pods did not take it: {failed}"
        if still:
            # Paused by hand on their admin console: the operator lifts only its own pause.
            return False, "Resuming", f"pooler.paused is false; still paused (by their console): {', '.join(still)}"
        return False, "Serving", f"pooler.paused is false: {report.pods} pods serve"
    done = report.fully_paused
    count = f"{len(done)}/{report.pods} pods paused"
    if report.failed:
        return False, "PauseNotPushed", f"{count}; pods that did not take the pause: {failed}"
    if len(done) == report.pods:
        return True, "Paused", f"{count}: new transactions wait in the queue, no server connection is open"
    waiting = ", ".join(f"{pod} ({servers} open)" for pod, servers in sorted(report.servers.items()) if servers)
    return False, "Pausing", f"{count}; waiting for transactions in flight to end on {waiting}"
