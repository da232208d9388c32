"""An emulated Kubernetes API server good enough for a real kopf operator (kmock 0.8 underneath).

Stock `kmock.KubernetesEmulator` serves discovery and keeps objects, but not the way kopf
needs them (see /work/shared/KUBERNETES_TESTING.md). This subclass keeps its own store and
answers every object request itself:

- metadata the API server assigns: uid, creationTimestamp, generation, resourceVersion
  (one global counter) and namespace; generation moves only on spec changes;
- optimistic concurrency: a failed JSON-patch `test` answers 422, a stale resourceVersion
  in a merge patch answers 409;
- `/status` is its own endpoint: writes to it change only `.status`, writes to the main
  endpoint never change `.status`;
- lists carry kind and resourceVersion, and honour `labelSelector` (equality terms);
- a watch takes its snapshot and subscribes under one lock, so no write falls in between;
- deletion honours finalizers (deletionTimestamp first), and a small garbage collector
  deletes objects whose controller owner is gone;
- the `scale` subresource answers GET, PATCH and PUT with an autoscaling/v1 Scale, mapped
  through the CRD's specReplicasPath, statusReplicasPath and labelSelectorPath (set in
  `scale_paths`), as `kubectl scale` and a HorizontalPodAutoscaler see it;
- with `token` set, a request without `Authorization: Bearer <token>` gets 401, as a real
  API server answers a missing or wrong credential.

It pokes at kmock internals, so kmock is pinned (pyproject: kmock==0.8).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import apps, rendering

Obj = dict[str, Any]
Key = tuple[str, str | None, str]  # ("group/version/plural", namespace, name)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: Any, patch: Any) -> Any:
    # RFC 7386; strategic-merge patches are treated the same (kopf sends merge patches).
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")] if path else []


def _json_patch(obj: Obj, ops: list[Obj]) -> Obj:
    doc = copy.deepcopy(obj)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, op["value"])
                else:
                    parent[index] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        else:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"unsupported op {kind}")
    return doc


def _at(obj: Obj, path: str) -> Any:
    """The value at a CRD JSON path such as `.spec.replicas`, or None."""
    node: Any = obj
    for part in path.strip(".").split(".") if path else []:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _matches(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


@attrs.define(kw_only=True)
class FakeKubernetes(kmock.KubernetesEmulator):
    store: dict[Key, Obj] = attrs.field(factory=dict, init=False)
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _watchers: list[tuple[str, str | None, asyncio.Queue[Obj]]] = attrs.field(factory=list, init=False)
    _state: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    token: str | None = attrs.field(default=None, init=False)
    refused: int = attrs.field(default=0, init=False)  # requests answered 401
    # "group/version/plural" -> the CRD's subresources.scale (specReplicasPath, ...)
    scale_paths: dict[str, dict[str, str]] = attrs.field(factory=dict, init=False)

    async def _handle(self, request: rendering.Request) -> Any:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            return await self._render_error(
                kmock.KubernetesError(status=401, reason="Unauthorized", message="Unauthorized")
            )
        if request.subresource == "scale" and request.resource is not None:
            try:
                return aiohttp.web.json_response(await self._serve_scale(request))
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
        # Skip KubernetesEmulator's own bookkeeping; the fallbacks below keep the state.
        return await apps.RawHandler._handle(self, request)

    # -- the scale subresource -------------------------------------------------------------------
    def _scale_of(self, resource: str, obj: Obj) -> Obj:
        paths = self.scale_paths[resource]
        meta = obj["metadata"]
        status: Obj = {"replicas": _at(obj, paths["statusReplicasPath"]) or 0}
        selector = _at(obj, paths.get("labelSelectorPath", ""))
        if selector:
            status["selector"] = selector
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta
            },
            "spec": {"replicas": _at(obj, paths["specReplicasPath"]) or 0},
            "status": status,
        }

    async def _serve_scale(self, request: rendering.Request) -> Obj:
        resource = self._resource(request)
        if resource not in self.scale_paths:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=f"{resource} has no scale subresource")
        key = (resource, request.namespace, request.name or "")
        async with self._state:
            obj = self.store.get(key)
            if obj is None:
                raise kmock.KubernetesObjectNotFoundError()
            scale = self._scale_of(resource, obj)
            if request.method == kmock.method.GET:
                return scale
            body = request.data if request.data is not None else json.loads(request.text or "null")
            if request.method == kmock.method.PATCH:
                wanted = _json_patch(scale, body) if isinstance(body, list) else _merge(scale, body)
            elif request.method == kmock.method.PUT:
                wanted = body if isinstance(body, dict) else {}
                version = (wanted.get("metadata") or {}).get("resourceVersion")
                if version and version != obj["metadata"].get("resourceVersion"):
                    raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            else:
                raise kmock.KubernetesError(status=405, reason="MethodNotAllowed", message=str(request.method))
            replicas = (wanted.get("spec") or {}).get("replicas")
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                raise kmock.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message=f"spec.replicas: must be a non-negative integer, got {replicas!r}",
                )
            patch: Obj = {}
            node = patch
            parts = self.scale_paths[resource]["specReplicasPath"].strip(".").split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = replicas
            return self._scale_of(resource, await self._patch(key, patch, subresource=None))

    # -- helpers for tests ---------------------------------------------------------------------
    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        return self.store.get((resource, namespace, name))

    def all(self, resource: str, namespace: str | None = None) -> list[Obj]:
        return [o for (r, ns, _), o in self.store.items() if r == resource and (namespace is None or ns == namespace)]

    def seen(self, action: str, resource: str) -> bool:
        group, version, plural = resource.split("/")
        want = kmock.resource(group=group, version=version, plural=plural)
        return any(req.action == kmock.action(action) and req.resource == want for req in list(self._requests))

    async def put_object(self, resource: str, obj: Obj) -> Obj:
        """Create an object as a client would (for tests)."""
        async with self._state:
            return await self._create(resource, obj.get("metadata", {}).get("namespace"), obj)

    async def patch_object(
        self, resource: str, namespace: str | None, name: str, patch: Obj, *, status: bool = False
    ) -> Obj:
        async with self._state:
            return await self._patch((resource, namespace, name), patch, subresource="status" if status else None)

    async def delete_object(self, resource: str, namespace: str | None, name: str) -> None:
        async with self._state:
            await self._delete((resource, namespace, name))

    # -- state changes (always under self._state) ----------------------------------------------
    async def _notify(self, resource: str, kind: str, obj: Obj) -> None:
        namespace = obj.get("metadata", {}).get("namespace")
        event = {"type": kind, "object": copy.deepcopy(obj)}
        for res, ns, queue in self._watchers:
            if res == resource and (ns is None or ns == namespace):
                queue.put_nowait(event)

    def _bump(self, obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    async def _create(self, resource: str, namespace: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if namespace is not None:
            meta["namespace"] = namespace
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self.store:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=f"{meta['name']} already exists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        self._bump(obj)
        self.store[key] = obj
        await self._notify(resource, "ADDED", obj)
        return obj

    async def _patch(self, key: Key, body: Any, *, subresource: str | None) -> Obj:
        old = self.store.get(key)
        if old is None:
            raise kmock.KubernetesObjectNotFoundError()
        if isinstance(body, list):
            new = _json_patch(old, body)
        else:
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and wanted_rv != old["metadata"].get("resourceVersion"):
                raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            new = _merge(old, body)
        if subresource == "status":
            new = (
                {**old, "status": new.get("status")}
                if new.get("status") is not None
                else {k: v for k, v in old.items() if k != "status"}
            )
        else:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
            for field in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if field in old["metadata"]:
                    new["metadata"][field] = old["metadata"][field]
            essence = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if essence(new) != essence(old):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        new = copy.deepcopy(new)
        self._bump(new)
        self.store[key] = new
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(key)
        else:
            await self._notify(key[0], "MODIFIED", new)
        return new

    async def _delete(self, key: Key) -> Obj:
        obj = self.store.get(key)
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = _now()
                self._bump(obj)
                self.store[key] = obj
                await self._notify(key[0], "MODIFIED", obj)
            return obj
        await self._remove(key)
        return obj

    async def _remove(self, key: Key) -> None:
        obj = self.store.pop(key)
        await self._notify(key[0], "DELETED", obj)
        # Garbage collection: whatever this object owned goes too (foreground order not modelled).
        uid = obj["metadata"].get("uid")
        for other_key, other in list(self.store.items()):
            owners = other.get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in owners) and other_key in self.store:
                await self._delete(other_key)

    # -- the API -------------------------------------------------------------------------------
    @staticmethod
    def _resource(request: rendering.Request) -> str:
        res = request.resource
        assert res is not None
        return f"{res.group}/{res.version}/{res.plural}"

    def _known(self, request: rendering.Request) -> None:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()

    def _list_kind(self, request: rendering.Request) -> str:
        info = self.resources.get(request.resource)
        return f"{info.kind}List" if info is not None and info.kind else "List"

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        self._known(request)
        resource = self._resource(request)
        selector = request.params.get("labelSelector")
        async with self._state:
            items = [
                copy.deepcopy(obj)
                for (res, ns, _), obj in sorted(self.store.items(), key=lambda kv: str(kv[0]))
                if res == resource
                and (request.namespace is None or ns == request.namespace)
                and _matches(obj, selector)
            ]
            version = str(next(self._versions))
        return {
            "apiVersion": "v1",
            "kind": self._list_kind(request),
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        self._known(request)
        yield b""  # send the headers now, as a real API server does
        resource = self._resource(request)
        selector = request.params.get("labelSelector")
        queue: asyncio.Queue[Obj] = asyncio.Queue()
        async with self._state:
            snapshot = [
                {"type": "ADDED", "object": copy.deepcopy(obj)}
                for (res, ns, _), obj in self.store.items()
                if res == resource and (request.namespace is None or ns == request.namespace)
            ]
            watcher = (resource, request.namespace, queue)
            self._watchers.append(watcher)
        timeout = float(request.params.get("timeoutSeconds") or 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for event in snapshot:
                if _matches(event["object"], selector):
                    yield event
            while (remaining := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=remaining)
                except TimeoutError:
                    break
                if _matches(event["object"], selector):
                    yield event
        finally:
            self._watchers.remove(watcher)

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        self._known(request)
        async with self._state:
            obj = self.store.get((self._resource(request), request.namespace, request.name or ""))
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        return copy.deepcopy(obj)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        self._known(request)
        body = request.data if isinstance(request.data, dict) else json.loads(request.text or "{}")
        async with self._state:
            return copy.deepcopy(await self._create(self._resource(request), request.namespace, body))

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        self._known(request)
        async with self._state:
            key = (self._resource(request), request.namespace, request.name or "")
            return copy.deepcopy(await self._patch(key, request.data, subresource=request.subresource))

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        self._known(request)
        async with self._state:
            key = (self._resource(request), request.namespace, request.name or "")
            return copy.deepcopy(await self._delete(key))
