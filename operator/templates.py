"""spec.pod and spec.service overrides laid over what render.py makes (pure, no I/O).

What a platform needs added (env, volumes, sidecars, a ServiceAccount, Service ports and
load-balancer settings) goes on top of the rendered objects; the secure defaults stay
unless the user sets the same key on purpose: a securityContext is merged key by key,
with the user's values winning, and sidecars get the pooler's restricted container
securityContext under their own.
"""

from __future__ import annotations

import copy
from typing import Any

from . import model

Obj = dict[str, Any]


def merged(defaults: Obj, override: Obj) -> Obj:
    """`override` over `defaults`, key by key in nested objects; lists and scalars replace."""
    out = copy.deepcopy(defaults)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_pod(pod_spec: Obj, pod: model.PodSpec) -> None:
    """Lay spec.pod's template fields over the rendered pod spec (its first container is the pooler)."""
    pooler = pod_spec["containers"][0]
    restricted = pooler["securityContext"]
    if pod.env:
        pooler["env"] = [*pooler.get("env", []), *copy.deepcopy(pod.env)]
    if pod.volume_mounts:
        pooler["volumeMounts"] = [*pooler["volumeMounts"], *copy.deepcopy(pod.volume_mounts)]
    if pod.volumes:
        pod_spec["volumes"] = [*pod_spec["volumes"], *copy.deepcopy(pod.volumes)]
    for sidecar in pod.containers:
        extra = copy.deepcopy(sidecar)
        extra["securityContext"] = merged(restricted, extra.get("securityContext") or {})
        pod_spec["containers"].append(extra)
    if pod.container_security_context:
        pooler["securityContext"] = merged(restricted, pod.container_security_context)
    if pod.security_context:
        pod_spec["securityContext"] = merged(pod_spec["securityContext"], pod.security_context)
    if pod.service_account_name:
        pod_spec["serviceAccountName"] = pod.service_account_name
    pod_spec["automountServiceAccountToken"] = pod.automount_service_account_token


def apply_service(service: Obj, spec: model.ServiceSpec) -> None:
    """Lay spec.service's fields over the rendered Service."""
    if spec.labels:
        service["metadata"]["labels"] = {**spec.labels, **service["metadata"]["labels"]}  # ours win
    port = service["spec"]["ports"][0]
    port["port"] = spec.port
    if spec.node_port is not None:
        port["nodePort"] = spec.node_port
    if spec.load_balancer_source_ranges:
        service["spec"]["loadBalancerSourceRanges"] = list(spec.load_balancer_source_ranges)
    if spec.external_traffic_policy is not None:
        service["spec"]["externalTrafficPolicy"] = spec.external_traffic_policy.value
