"""Any kubeconfig kubectl accepts: an exec plugin user against an API server that checks the token.

The plugin is a small script printing an ExecCredential (as EKS's, GKE's, AKS's and OIDC
helpers do); the emulated API server answers 401 to any request without its token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pgfleet.operator.kube import ApiError, Credentials, KubeClient, collection_path, object_path

from .conftest import eventually, running_operator
from .test_operator_lifecycle import DEPLOYMENTS, NS, PGPOOLS, SECRETS, creds_secret, pgpool

PLUGIN = """\
import json, os, pathlib, sys

here = pathlib.Path(sys.argv[1])
request = json.loads(os.environ["KUBERNETES_EXEC_INFO"])  # what a client must pass to a plugin
with open(here / "runs", "a") as runs:
    runs.write(request["kind"] + "\\n")
status = {"token": (here / "token").read_text().strip()}
expiry = (here / "expiry").read_text().strip() if (here / "expiry").exists() else ""
if expiry:
    status["expirationTimestamp"] = expiry
print(json.dumps({"apiVersion": request["apiVersion"], "kind": "ExecCredential", "status": status}))
"""


class ExecPlugin:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "plugin.py").write_text(PLUGIN)

    def issue(self, token: str, expiry: str = "") -> None:
        (self.root / "token").write_text(token)
        (self.root / "expiry").write_text(expiry)

    @property
    def runs(self) -> int:
        path = self.root / "runs"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def kubeconfig(self, server: str) -> Path:
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(self.root / "plugin.py"), str(self.root)],
                "interactiveMode": "Never",
            }
        }
        path = self.root / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "cloud",
                    "clusters": [{"name": "cloud", "cluster": {"server": server}}],
                    "users": [{"name": "cloud-user", "user": user}],
                    "contexts": [
                        {"name": "cloud", "context": {"cluster": "cloud", "user": "cloud-user", "namespace": NS}}
                    ],
                }
            )
        )
        return path


@pytest.fixture()
def plugin(tmp_path: Path) -> ExecPlugin:
    return ExecPlugin(tmp_path)


def config_map(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}, "data": {"k": "v"}}


async def test_exec_plugin_token_reaches_the_api(api: Any, plugin: ExecPlugin) -> None:
    api.token = "exec-token-1"
    plugin.issue("exec-token-1")
    client = await KubeClient.connect(str(plugin.kubeconfig(str(api.url))))
    try:
        await client.create(collection_path("v1", "ConfigMap", NS), config_map("made"))
        assert (await client.get(object_path("v1", "ConfigMap", NS, "made")) or {})["data"] == {"k": "v"}
        assert [o["metadata"]["name"] for o in await client.list(collection_path("v1", "ConfigMap", NS))] == ["made"]
    finally:
        await client.close()
    assert api.refused == 0
    assert plugin.runs == 1  # a token without an expiry is kept, not fetched per request
    login = await (await Credentials.load(str(plugin.root / "kubeconfig"))).login()
    assert login.authorization == "Bearer exec-token-1" and login.namespace == NS


async def test_a_wrong_token_is_refused(api: Any, kubeconfig: Any) -> None:
    # The check the exec test relies on can fail: the emulator refuses a token it does not know.
    api.token = "the-right-one"
    client = await KubeClient.connect(str(kubeconfig(str(api.url))))  # presents "test-token"
    try:
        with pytest.raises(ApiError) as refused:
            await client.list(collection_path("v1", "ConfigMap", NS))
    finally:
        await client.close()
    assert refused.value.status == 401


async def test_a_revoked_token_is_renewed_through_the_plugin(api: Any, plugin: ExecPlugin) -> None:
    api.token = "exec-token-1"
    plugin.issue("exec-token-1")
    client = await KubeClient.connect(str(plugin.kubeconfig(str(api.url))))
    try:
        await client.create(collection_path("v1", "ConfigMap", NS), config_map("before"))
        # The cloud rotates the credential: the old token is refused, the plugin has a new one.
        api.token = "exec-token-2"
        plugin.issue("exec-token-2")
        await client.create(collection_path("v1", "ConfigMap", NS), config_map("after"))
    finally:
        await client.close()
    assert api.get("/v1/configmaps", NS, "after") is not None
    assert api.refused == 1 and plugin.runs == 2


async def test_an_expired_token_is_fetched_again_before_the_request(api: Any, plugin: ExecPlugin) -> None:
    api.token = "short-lived"
    plugin.issue("short-lived", expiry="2000-01-01T00:00:00Z")  # already expired when issued
    client = await KubeClient.connect(str(plugin.kubeconfig(str(api.url))))
    try:
        await client.list(collection_path("v1", "ConfigMap", NS))
        await client.list(collection_path("v1", "ConfigMap", NS))
    finally:
        await client.close()
    # Once at login, then before each request, since each time the token has run out.
    assert plugin.runs == 3 and api.refused == 0


async def test_the_operator_runs_with_an_exec_plugin_kubeconfig(
    api: Any, plugin: ExecPlugin, postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.token = "operator-exec-token"
    plugin.issue("operator-exec-token")
    monkeypatch.setenv("KUBECONFIG", str(plugin.kubeconfig(str(api.url))))
    async with running_operator(api):
        await api.put_object(SECRETS, creds_secret())
        await api.put_object(PGPOOLS, pgpool(postgres))
        await eventually(
            lambda: (api.get(PGPOOLS, NS, "main") or {}).get("status", {}).get("observedGeneration") == 1,
            what="the PgPool reconciled",
        )
        assert api.get(DEPLOYMENTS, NS, "main") is not None
    # kopf's watches and the operator's own calls all carried the plugin's token.
    assert api.refused == 0 and plugin.runs >= 1
    runs = (plugin.root / "runs").read_text().splitlines()
    assert set(runs) == {"ExecCredential"}, json.dumps(runs)
