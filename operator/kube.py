"""The operator's way into the Kubernetes API: credentials and raw-dict calls, through kubernetes_asyncio.

Credentials come from the pod's ServiceAccount in a cluster, else from $KUBECONFIG (or
~/.kube/config) with everything kubectl accepts there: tokens, client certificates, exec
plugins (EKS, GKE, AKS, OIDC helpers), auth providers. kubernetes_asyncio reads them, runs
exec plugins without blocking the event loop, and renews what expires; kopf's own login
gets the same credentials (see `handlers.login`), so both reach the API the same way.

The operator needs only a few verbs on a handful of kinds, and dicts are what the render
layer produces: `KubeClient` sends raw dicts over the client's authenticated session
instead of converting them to typed models and back.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, load_kube_config

Obj = dict[str, Any]

# Plural resource names of the kinds the operator touches.
PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "PgPool": "pgpools",
    "PodMonitor": "podmonitors",
    "CustomResourceDefinition": "customresourcedefinitions",
}
# Kinds that live outside namespaces.
CLUSTER_SCOPED = {"CustomResourceDefinition"}

REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    """A non-2xx answer of the API server, with its status code and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NoCredentials(Exception):
    """Neither a ServiceAccount nor a usable kubeconfig; the message says what was tried."""


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind in CLUSTER_SCOPED or namespace is None:
        return f"{prefix}/{PLURALS[kind]}"
    return f"{prefix}/namespaces/{quote(namespace)}/{PLURALS[kind]}"


def object_path(api_version: str, kind: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


def path_of(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])


# -- credentials ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Login:
    """What a connection needs, in the terms kopf's ConnectionInfo uses."""

    server: str
    authorization: str | None  # the whole header value: "Bearer ...", "Basic ..."
    ca_path: str | None
    insecure: bool
    certificate_path: str | None
    private_key_path: str | None
    expiration: datetime.datetime | None  # when an exec plugin's token runs out
    namespace: str | None  # the context's (or the ServiceAccount's) namespace


def _in_cluster() -> bool:
    return bool(os.environ.get(SERVICE_HOST_ENV_NAME)) and os.path.isfile(SERVICE_TOKEN_FILENAME)


def _service_account_namespace() -> str | None:
    # A small local file the kubelet mounts: reading it does not stall the loop.
    path = os.path.join(os.path.dirname(SERVICE_TOKEN_FILENAME), "namespace")
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return file.read().strip() or None


def _any_file(paths: str) -> bool:
    return any(os.path.isfile(path) for path in paths.split(os.pathsep))


def kubeconfig_paths() -> str:
    """$KUBECONFIG (several paths joined by ':' are merged, as kubectl does), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


class Credentials:
    """A loaded configuration that keeps itself valid: exec tokens and ServiceAccount tokens renew."""

    def __init__(self, configuration: Configuration, loader: KubeConfigLoader | None, namespace: str | None) -> None:
        self.configuration = configuration
        self._loader = loader
        self._namespace = namespace
        if loader is not None:
            # Asked before every request; cheap unless an exec plugin's token has expired.
            configuration.refresh_api_key_hook = self._refresh

    @classmethod
    async def load(cls, kubeconfig: str | None = None, context: str | None = None) -> Credentials:
        configuration = type.__call__(Configuration)  # a fresh one, not a copy of the global default
        if kubeconfig is None and _in_cluster():
            InClusterConfigLoader(
                token_filename=SERVICE_TOKEN_FILENAME, cert_filename=SERVICE_CERT_FILENAME
            ).load_and_set(configuration)
            return cls(configuration, None, _service_account_namespace())
        paths = kubeconfig or kubeconfig_paths()
        if not _any_file(paths):
            raise NoCredentials(f"not in a cluster, and no kubeconfig at {paths}")
        try:
            loader = await load_kube_config(
                config_file=paths, context=context, client_configuration=configuration, persist_config=False
            )
        except ConfigException as exc:
            raise NoCredentials(f"kubeconfig {paths}: {exc}") from exc
        current = loader.current_context or {}
        namespace = (current.get("context") or {}).get("namespace")
        return cls(configuration, loader, namespace)

    async def _refresh(self, configuration: Configuration) -> None:
        loader = self._loader
        if loader is None or getattr(loader, "exec_plugin_expiry", None) is None:
            return  # no exec plugin, or one whose token does not say when it expires
        await loader.load_from_exec_plugin()  # runs the plugin again only once the token expired
        configuration.api_key["BearerToken"] = loader.token

    async def renew(self) -> None:
        """Log in again now (after a 401): an exec plugin runs again even if its token looked valid."""
        loader = self._loader
        if loader is None:
            return
        if hasattr(loader, "exec_plugin_expiry"):
            del loader.exec_plugin_expiry
        await loader.load_and_set(self.configuration)

    async def login(self) -> Login:
        config = self.configuration
        authorization = await config.get_api_key_with_prefix("BearerToken")
        expiry = getattr(self._loader, "exec_plugin_expiry", None) if self._loader is not None else None
        return Login(
            server=str(config.host),
            authorization=str(authorization) if authorization else None,
            ca_path=config.ssl_ca_cert or None,
            insecure=not config.verify_ssl,
            certificate_path=config.cert_file or None,
            private_key_path=config.key_file or None,
            expiration=expiry if isinstance(expiry, datetime.datetime) else None,
            namespace=self._namespace,
        )


# -- the client ------------------------------------------------------------------------------------
def _api_error(exc: ApiException) -> ApiError:
    body: Any = exc.body
    try:
        payload = json.loads(body) if isinstance(body, (str, bytes)) and body else {}
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    return ApiError(int(exc.status or 0), str(payload.get("reason") or exc.reason), str(payload.get("message", "")))


class KubeClient:
    """GET, LIST, POST, merge PATCH and DELETE of raw dicts on the API server the credentials name."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._api = ApiClient(configuration=credentials.configuration)
        self._api.user_agent = "pgfleet-operator"

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeClient:
        return cls(await Credentials.load(kubeconfig, context))

    async def close(self) -> None:
        await self._api.close()

    async def _call(
        self, method: str, path: str, body: Any, params: Mapping[str, str] | None, content_type: str
    ) -> Obj:
        result = await self._api.call_api(
            path,
            method,
            query_params=dict(params or {}),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            response_types_map={200: "object", 201: "object", 202: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT,
        )
        return result if isinstance(result, dict) else {}

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        try:
            try:
                return await self._call(method, path, body, params, content_type)
            except ApiException as exc:
                if exc.status != 401:
                    raise
                # A revoked or rotated credential: log in again once, as kubectl would.
                await self.credentials.renew()
                return await self._call(method, path, body, params, content_type)
        except ApiException as exc:
            raise _api_error(exc) from exc

    async def get(self, path: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str | None = None) -> list[Obj]:
        params = {"labelSelector": label_selector} if label_selector else None
        items = (await self._request("GET", path, params=params)).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, path: str, body: Obj) -> Obj:
        return await self._request("POST", path, body)

    async def merge_patch(self, path: str, body: Obj) -> Obj:
        return await self._request("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str) -> bool:
        """Delete the object; False when it was already gone."""
        try:
            await self._request("DELETE", path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
