"""spec.pod and spec.service templates: rendered over secure defaults, validated by the CRD's own schema."""

from __future__ import annotations

from typing import Any

import yaml
from pgfleet.operator import model, render

from .conftest import pgpool_body
from .crdcheck import admit


def rendered(**spec: Any) -> render.Children:
    body, errors = admit(pgpool_body(**spec))
    assert errors == [], errors  # what the API server would store, defaults applied
    pgpool = model.PgPool.model_validate({**body, "metadata": pgpool_body()["metadata"]})
    facts = render.Facts(
        image="pgfleet:test",
        username="u",
        password="p",
        token="t",
        start_limit=1,
    )
    return render.render(pgpool, facts)


def pod_spec(children: render.Children) -> dict[str, Any]:
    return dict(children.deployment["spec"]["template"]["spec"])


def test_defaults_stay_secure() -> None:
    spec = pod_spec(rendered())
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (pooler,) = spec["containers"]
    assert pooler["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec


def test_pod_template_fields_are_added_and_security_is_merged_not_replaced() -> None:
    children = rendered(
        pod={
            "env": [
                {"name": "TZ", "value": "UTC"},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
            "volumes": [{"name": "certs", "secret": {"secretName": "ca"}}],
            "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
            "containers": [
                {"name": "log-shipper", "image": "shipper:1"},
                {"name": "proxy", "image": "p:1", "securityContext": {"runAsUser": 2000}},
            ],
            "securityContext": {"fsGroup": 3000, "supplementalGroups": [4000]},
            "containerSecurityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"]}},
            "serviceAccountName": "pgfleet-pods",
            "automountServiceAccountToken": True,
        }
    )
    spec = pod_spec(children)
    pooler, shipper, proxy = spec["containers"]
    assert pooler["env"] == [
        {"name": "TZ", "value": "UTC"},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
    ]
    assert [m["name"] for m in pooler["volumeMounts"]] == ["config", "tmp", "certs"]
    assert [v["name"] for v in spec["volumes"]][-1] == "certs"
    # The user's keys win; the defaults they did not touch stay.
    assert spec["securityContext"]["fsGroup"] == 3000 and spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["supplementalGroups"] == [4000]
    assert pooler["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert pooler["securityContext"]["readOnlyRootFilesystem"] is True
    # Sidecars run restricted unless they say otherwise.
    assert shipper["securityContext"]["allowPrivilegeEscalation"] is False
    assert shipper["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert proxy["securityContext"]["runAsUser"] == 2000 and proxy["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] == "pgfleet-pods" and spec["automountServiceAccountToken"] is True
    # A template change rolls the pods: the Deployment's hash moves with it.
    assert (
        children.deployment["metadata"]["annotations"][render.SPEC_HASH]
        != rendered().deployment["metadata"]["annotations"][render.SPEC_HASH]
    )


def test_service_fields() -> None:
    children = rendered(
        service={
            "type": "LoadBalancer",
            "port": 6432,
            "nodePort": 30432,
            "loadBalancerSourceRanges": ["10.0.0.0/8"],
            "externalTrafficPolicy": "Local",
            "labels": {"team": "db", "app.kubernetes.io/name": "mine"},
        }
    )
    service = children.service
    assert service["spec"]["ports"] == [
        {"name": "postgres", "port": 6432, "targetPort": "postgres", "protocol": "TCP", "nodePort": 30432}
    ]
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["metadata"]["labels"]["team"] == "db"
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "pgfleet-pooler"  # ours win: the selector
    # Applications are told the Service's port.
    assert children.app_secret["stringData"]["port"] == "6432" and ":6432/" in children.app_secret["stringData"]["uri"]
    assert yaml.safe_load(children.config_map["data"]["pooler.yaml"])["listen_port"] == 5432  # the pods' own


def test_the_crd_refuses_what_would_break_the_pods_or_the_service() -> None:
    def refused(**spec: Any) -> list[str]:
        return admit(pgpool_body(**spec))[1]

    assert refused(pod={"volumes": [{"name": "config", "emptyDir": {}}]}) == [
        ".spec.pod.volumes: volumes: config and tmp are the pooler's own"
    ]
    assert refused(pod={"volumeMounts": [{"name": "x", "mountPath": "/etc/pgfleet"}]}) == [
        ".spec.pod.volumeMounts: volumeMounts: /etc/pgfleet and /tmp are the pooler's own"
    ]
    assert refused(pod={"volumeMounts": [{"name": "x"}]}) == [
        ".spec.pod.volumeMounts: volumeMounts: every mount needs a name and a mountPath"
    ]
    assert refused(pod={"containers": [{"name": "pooler", "image": "x"}]}) == [
        ".spec.pod.containers: containers: the name pooler is taken"
    ]
    assert refused(pod={"env": [{"value": "no name"}]}) == [".spec.pod.env: every entry needs a name"]
    assert refused(service={"loadBalancerSourceRanges": ["10.0.0.0/8"]}) == [
        ".spec.service: service.loadBalancerSourceRanges needs service.type LoadBalancer"
    ]
    assert refused(service={"externalTrafficPolicy": "Local"}) == [
        ".spec.service: service.externalTrafficPolicy needs service.type NodePort or LoadBalancer"
    ]
    assert refused(service={"type": "NodePort", "nodePort": 80})  # outside the node-port range
    assert refused(service={"type": "NodePort", "externalTrafficPolicy": "Sideways"})
    assert refused(service={"type": "NodePort", "nodePort": 30001, "externalTrafficPolicy": "Local"}) == []
