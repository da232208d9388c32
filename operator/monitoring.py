"""spec.monitoring.podMonitor: a Prometheus Operator PodMonitor for the pods' /metrics (pure render).

Rendered only where the cluster serves the PodMonitor kind (monitoring.coreos.com/v1); the
reconcile asks the API's discovery first and says in a condition why there is none.
"""

from __future__ import annotations

from typing import Any

from . import model, render

GROUP_VERSION = "monitoring.coreos.com/v1"
MONITORING = "Monitoring"  # the condition


def render_pod_monitor(pgpool: model.PgPool) -> dict[str, Any]:
    spec = pgpool.spec.monitoring
    endpoint: dict[str, Any] = {"port": "http", "path": "/metrics"}
    if spec.interval:
        endpoint["interval"] = spec.interval
    meta = render.child_meta(pgpool, pgpool.name)
    meta["labels"] = {**spec.labels, **meta["labels"]}  # Prometheus selects on these; ours win
    return render.stamped(
        {
            "apiVersion": GROUP_VERSION,
            "kind": "PodMonitor",
            "metadata": meta,
            "spec": {
                "selector": {"matchLabels": render.selector_labels(pgpool.name)},
                "podMetricsEndpoints": [endpoint],
            },
        }
    )
