"""spec.monitoring.podMonitor: a PodMonitor where the cluster serves the kind, a condition where it does not."""

from __future__ import annotations

from typing import Any

import kmock
from pgfleet.operator import model
from pgfleet.operator.monitoring import render_pod_monitor

from .conftest import eventually, pgpool_body
from .crdcheck import admit
from .test_operator_lifecycle import NS, PGPOOLS, SECRETS, condition, creds_secret, pgpool

PODMONITORS = "monitoring.coreos.com/v1/podmonitors"


def test_render_selects_the_pods_metrics_port() -> None:
    body = pgpool_body(monitoring={"podMonitor": True, "labels": {"release": "prom"}, "interval": "15s"})
    monitor = render_pod_monitor(model.PgPool.model_validate(body))
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "pgfleet-pooler", "app.kubernetes.io/instance": "main"}
    }
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pgfleet-operator"
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"


def test_the_crd_checks_the_interval() -> None:
    assert admit(pgpool_body(monitoring={"podMonitor": True, "interval": "30s"}))[1] == []
    errors = admit(pgpool_body(monitoring={"podMonitor": True, "interval": "soon"}))[1]
    assert errors and "spec.monitoring.interval" in errors[0]


async def test_without_the_kind_a_condition_says_why(api: Any, operator: Any, postgres: Any) -> None:
    await api.put_object(SECRETS, creds_secret())
    await api.put_object(PGPOOLS, pgpool(postgres, monitoring={"podMonitor": True}))
    cond = await eventually(
        lambda: condition(api.get(PGPOOLS, NS, "main"), "Monitoring"), what="the Monitoring condition"
    )
    assert cond["status"] == "False" and cond["reason"] == "PodMonitorUnavailable"
    assert "install the Prometheus Operator's CRDs" in cond["message"]


async def test_with_the_kind_the_pod_monitor_comes_and_goes(api: Any, operator: Any, postgres: Any) -> None:
    api.resources[PODMONITORS] = kmock.ResourceInfo(
        kind="PodMonitor",
        singular="podmonitor",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"},
    )
    await api.put_object(SECRETS, creds_secret())
    await api.put_object(PGPOOLS, pgpool(postgres, monitoring={"podMonitor": True}))
    monitor = await eventually(lambda: api.get(PODMONITORS, NS, "main"), what="the PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics"}]
    cond = await eventually(
        lambda: (c := condition(api.get(PGPOOLS, NS, "main"), "Monitoring")) and c["status"] == "True" and c,
        what="Monitoring=True",
    )
    assert cond["reason"] == "PodMonitorApplied"

    await api.patch_object(PGPOOLS, NS, "main", {"spec": {"monitoring": {"podMonitor": False}}})
    await eventually(lambda: api.get(PODMONITORS, NS, "main") is None, what="the PodMonitor deleted")
