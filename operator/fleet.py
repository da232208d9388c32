"""Talking to running pooler pods over their HTTP control port: pushing pool limits live,
and reading back how many clients each holds (GET /status).

A new pool size reaches new pods through the ConfigMap; running pods get it with
PUT /limits, so a change of replicas or budget never needs a rolling restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class PushResult:
    pushed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # pod name -> why
    clients: dict[str, int] = field(default_factory=dict)  # pod name -> client connections, where it told

    @property
    def total_clients(self) -> int | None:
        """Clients over the pods that told; None if none did."""
        return sum(self.clients.values()) if self.clients else None


def running_pod_addresses(pods: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Pod name -> IP of the pods that could hold backends (running, not being deleted)."""
    out = {}
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        out[str(meta["name"])] = str(status["podIP"])
    return out


async def push_limits(
    addresses: Mapping[str, str], limits: Mapping[str, Any], token: str, *, port: int, timeout: float = 5.0
) -> PushResult:
    result = PushResult()
    if not addresses:
        return result
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), headers=headers) as session:

        async def one(name: str, ip: str) -> None:
            host = f"[{ip}]" if ":" in ip else ip
            try:
                async with session.put(f"http://{host}:{port}/limits", json=dict(limits)) as response:
                    if response.status >= 300:
                        result.failed[name] = f"HTTP {response.status}: {(await response.text())[:200]}"
                        return
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                result.failed[name] = str(exc) or type(exc).__name__
                return
            result.pushed.append(name)
            # Only for `kubectl get pgpools`: a pod that does not say is left out, not failed.
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
                async with session.get(f"http://{host}:{port}/status") as response:
                    if response.status == 200:
                        result.clients[name] = int((await response.json())["clients"])

        await asyncio.gather(*(one(name, ip) for name, ip in sorted(addresses.items())))
    return result
