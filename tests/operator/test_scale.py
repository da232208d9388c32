"""The PgPool's scale subresource, as `kubectl scale` and a HorizontalPodAutoscaler use it.

The emulated API server answers GET/PATCH/PUT …/pgpools/NAME/scale with an autoscaling/v1
Scale mapped through the committed CRD's scale paths, as a real API server does; the
operator follows a change made there.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from pgfleet.operator.kube import ApiError, KubeClient

from .conftest import eventually
from .test_operator_lifecycle import DEPLOYMENTS, NS, PGPOOLS, SECRETS, creds_secret, pgpool

SCALE = f"/apis/pgfleet.io/v1alpha1/namespaces/{NS}/pgpools/main/scale"


async def test_scale_reads_and_writes_spec_replicas(api: Any, kubeconfig: Any, postgres: Any) -> None:
    await api.put_object(PGPOOLS, pgpool(postgres))
    await api.patch_object(PGPOOLS, NS, "main", {"status": {"replicas": 2, "selector": "a=b"}}, status=True)
    client = await KubeClient.connect(str(kubeconfig(str(api.url))))
    try:
        scale = await client.get(SCALE)
        assert scale is not None
        assert scale["apiVersion"] == "autoscaling/v1" and scale["kind"] == "Scale"
        assert scale["spec"] == {"replicas": 3}
        assert scale["status"] == {"replicas": 2, "selector": "a=b"}
        assert scale["metadata"]["name"] == "main"

        scaled = await client.merge_patch(SCALE, {"spec": {"replicas": 5}})
        assert scaled["spec"]["replicas"] == 5
        stored = api.get(PGPOOLS, NS, "main")
        assert stored["spec"]["replicas"] == 5 and stored["metadata"]["generation"] == 2

        with pytest.raises(ApiError) as refused:
            await client.merge_patch(SCALE, {"spec": {"replicas": -1}})
        assert refused.value.status == 422
    finally:
        await client.close()

    # PUT, as an HPA writes: a stale resourceVersion is a conflict, a fresh one applies.
    auth = {"Authorization": "Bearer test-token"}
    async with aiohttp.ClientSession(headers=auth) as http:
        stale = {**scale, "spec": {"replicas": 4}}
        async with http.put(f"{api.url}{SCALE}", json=stale) as response:
            assert response.status == 409
        fresh = {**scaled, "spec": {"replicas": 4}}
        async with http.put(f"{api.url}{SCALE}", json=fresh) as response:
            assert response.status == 200 and (await response.json())["spec"]["replicas"] == 4
    assert api.get(PGPOOLS, NS, "main")["spec"]["replicas"] == 4


async def test_the_operator_follows_the_scale_subresource(
    api: Any, operator: Any, kubeconfig: Any, postgres: Any
) -> None:
    await api.put_object(SECRETS, creds_secret())
    await api.put_object(PGPOOLS, pgpool(postgres))
    await eventually(lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 3)
    client = await KubeClient.connect(str(kubeconfig(str(api.url))))
    try:
        await client.merge_patch(SCALE, {"spec": {"replicas": 6}})  # kubectl scale pgpool main --replicas=6
    finally:
        await client.close()
    await eventually(
        lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 6,
        what="the Deployment at the replicas set through the scale subresource",
    )
    # Scaling never moves the budget: more pods share the same backends.
    await eventually(
        lambda: (api.get(PGPOOLS, NS, "main").get("status") or {}).get("budget", {}).get("total") == 40 - 4,
        what="status.budget.total with 6 replicas",
    )
    # Without spec.autoscaling the count is the user's (or an HPA's): reconciles since left it.
    assert api.get(PGPOOLS, NS, "main")["spec"]["replicas"] == 6
    assert api.get(DEPLOYMENTS, NS, "main")["spec"]["replicas"] == 6
