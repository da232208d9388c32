"""Applying rendered children: create, patch only on change, and remove what the user removed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pgfleet.operator import apply as applying
from pgfleet.operator.kube import KubeClient
from pgfleet.operator.render import SPEC_HASH, spec_hash

DEPLOYMENTS = "apps/v1/deployments"


def test_merge_patch_rfc7386() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2], "gone": {"x": 1}}
    new = {"a": 1, "b": {"c": 5}, "l": [2], "added": True}
    assert applying.merge_patch(old, new) == {"b": {"c": 5, "d": None}, "l": [2], "added": True, "gone": None}
    assert applying.merge_patch(new, new) == {}


def deployment(**pod_spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "ns", "labels": {"app": "x"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i"}], **pod_spec}}},
    }
    obj["metadata"]["annotations"] = {SPEC_HASH: spec_hash(obj)}
    return obj


def test_patch_removes_what_was_applied_before_and_is_gone_now() -> None:
    before = applying.with_last_applied(deployment(nodeSelector={"disk": "ssd", "zone": "a"}))
    live = {**before, "status": {"readyReplicas": 2}}
    live["metadata"] = {**before["metadata"], "uid": "u", "resourceVersion": "7"}
    live["metadata"]["annotations"] = {**before["metadata"]["annotations"], "deployment.kubernetes.io/revision": "3"}
    patch = applying.patch_for(live, deployment(nodeSelector={"disk": "ssd"}))
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"zone": None}
    # Fields that others own are not touched.
    assert "status" not in patch and "uid" not in patch["metadata"]
    assert "deployment.kubernetes.io/revision" not in patch["metadata"]["annotations"]


def test_secret_values_stay_out_of_the_record() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": "ns", "annotations": {SPEC_HASH: "h"}},
        "stringData": {"password": "hunter2"},
    }
    record = applying.with_last_applied(secret)["metadata"]["annotations"][applying.LAST_APPLIED]
    assert "hunter2" not in record
    live = applying.with_last_applied(secret)
    changed = {**secret, "stringData": {"password": "new"}}
    assert applying.patch_for(live, changed)["stringData"] == {"password": "new"}


@pytest.fixture()
async def client(api: Any, kubeconfig: Any) -> AsyncIterator[KubeClient]:
    kube = await KubeClient.connect(str(kubeconfig(str(api.url))))
    yield kube
    await kube.close()


async def test_apply_creates_then_leaves_alone_then_patches(api: Any, client: KubeClient) -> None:
    assert await applying.apply(client, deployment()) is applying.Applied.CREATED
    stored = api.get(DEPLOYMENTS, "ns", "d")
    assert json.loads(stored["metadata"]["annotations"][applying.LAST_APPLIED])["spec"]["replicas"] == 2

    version = stored["metadata"]["resourceVersion"]
    assert await applying.apply(client, deployment()) is applying.Applied.UNCHANGED
    assert api.get(DEPLOYMENTS, "ns", "d")["metadata"]["resourceVersion"] == version  # no write at all

    assert await applying.apply(client, deployment(priorityClassName="high")) is applying.Applied.PATCHED
    assert api.get(DEPLOYMENTS, "ns", "d")["spec"]["template"]["spec"]["priorityClassName"] == "high"
    assert await applying.apply(client, deployment()) is applying.Applied.PATCHED
    assert "priorityClassName" not in api.get(DEPLOYMENTS, "ns", "d")["spec"]["template"]["spec"]


async def test_apply_adopts_an_object_made_by_someone_else(api: Any, client: KubeClient) -> None:
    foreign = deployment()
    del foreign["metadata"]["annotations"]
    foreign["spec"]["replicas"] = 9
    await api.put_object(DEPLOYMENTS, foreign)
    assert await applying.apply(client, deployment()) is applying.Applied.PATCHED
    assert api.get(DEPLOYMENTS, "ns", "d")["spec"]["replicas"] == 2
