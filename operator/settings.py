"""Operator settings from the environment, so the same image runs in a cluster and in tests.

Every knob is a `PGFLEET_*` variable; the defaults suit production.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/pgfleet/pgfleet:latest"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    pooler_image: str | None  # None: the operator's own image, else DEFAULT_IMAGE
    reconcile_interval: float  # how often each PgPool is re-checked (secrets, database, pods)
    probe_timeout: float  # connecting to and querying the database
    push_timeout: float  # PUT /limits to one pod
    watch_server_timeout: float  # asks the API server to end each watch after this long
    watch_client_timeout: float  # gives up on a watch that went silent
    budget_period: float = 3.0  # seconds between two periods of each server's budget loop
    pod_http_port: int = 8080  # the pods' control port the operator talks to (tests run several poolers)
    metrics_port: int = 8000  # the operator's own /metrics (budget per PgPool and server); 0: none
    metrics_addr: str = "0.0.0.0"  # Prometheus scrapes the pod from outside it

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(
            pooler_image=os.environ.get("PGFLEET_POOLER_IMAGE") or None,
            reconcile_interval=_float("PGFLEET_RECONCILE_INTERVAL", 30.0),
            probe_timeout=_float("PGFLEET_PROBE_TIMEOUT", 5.0),
            push_timeout=_float("PGFLEET_PUSH_TIMEOUT", 5.0),
            watch_server_timeout=_float("PGFLEET_WATCH_SERVER_TIMEOUT", 300.0),
            watch_client_timeout=_float("PGFLEET_WATCH_CLIENT_TIMEOUT", 330.0),
            budget_period=_float("PGFLEET_BUDGET_PERIOD", 3.0),
            pod_http_port=int(_float("PGFLEET_POD_HTTP_PORT", 8080)),
            metrics_port=int(_float("PGFLEET_OPERATOR_METRICS_PORT", 8000)),
            metrics_addr=os.environ.get("PGFLEET_OPERATOR_METRICS_ADDR") or "0.0.0.0",
        )
