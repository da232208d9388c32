"""A small asyncio client for the Kubernetes API: GET, LIST, POST, merge PATCH, DELETE on raw dicts.

The operator needs only these verbs on a handful of kinds, and dicts are what the render
layer produces; a typed client would convert them back and forth for nothing. The
credentials come from kopf's login handlers (see `handlers.py`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

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
}


class ApiError(Exception):
    """A non-2xx answer of the API server, with its status code and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{PLURALS[kind]}"


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


def path_of(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


class KubeClient:
    def __init__(self, server: str, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None) -> None:
        self.server = server.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "pgfleet-operator", **headers},
            connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(
            method, self.server + path, json=body, params=params, headers=headers
        ) as response:
            payload = await response.json(content_type=None) if response.content_length != 0 else {}
            if response.status >= 400:
                payload = payload if isinstance(payload, dict) else {}
                raise ApiError(
                    response.status, str(payload.get("reason", response.reason)), str(payload.get("message", ""))
                )
            return payload if isinstance(payload, dict) else {}

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
