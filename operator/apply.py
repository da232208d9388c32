"""Bringing one child object to its rendered form: create it, patch what changed, or leave it.

A patch is a JSON merge patch from what the operator applied last time (kept in the
`pgfleet.io/last-applied` annotation) to what it renders now, so a setting the user removes
from the PgPool is removed from the child too, while fields that the API server or other
controllers own are left alone. The spec-hash annotation decides whether to patch at all.
"""

from __future__ import annotations

import copy
import json
from enum import Enum
from typing import Any

from .kube import ApiError, KubeClient, collection_path, path_of
from .render import SPEC_HASH

Obj = dict[str, Any]

LAST_APPLIED = "pgfleet.io/last-applied"


class Applied(str, Enum):
    CREATED = "created"
    PATCHED = "patched"
    UNCHANGED = "unchanged"


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch that turns `old` into `new` (keys only in `old` become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: Obj = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def applied_form(obj: Obj) -> Obj:
    """What the last-applied annotation records: the object minus itself and secret values."""
    form = copy.deepcopy(obj)
    # Secret values must not be copied into an annotation anybody can read; their keys
    # never change, so nothing needs removing there anyway.
    form.pop("stringData", None)
    if obj.get("kind") == "Secret":
        form.pop("data", None)
    form["metadata"].get("annotations", {}).pop(LAST_APPLIED, None)
    return form


def with_last_applied(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    record = json.dumps(applied_form(obj), sort_keys=True, separators=(",", ":"))
    out["metadata"].setdefault("annotations", {})[LAST_APPLIED] = record
    return out


def patch_for(live: Obj, desired: Obj) -> Obj:
    """The merge patch that brings `live` to `desired`, given what was applied last."""
    annotations = live.get("metadata", {}).get("annotations") or {}
    try:
        last = json.loads(annotations[LAST_APPLIED])
    except (KeyError, ValueError):
        last = None
    target = with_last_applied(desired)
    if last is None:
        # Never applied by us (or the record was lost): set what we own, remove nothing.
        return target
    patch: Obj = merge_patch(last, applied_form(target))
    patch.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED] = target["metadata"]["annotations"][
        LAST_APPLIED
    ]
    if "stringData" in target:
        patch["stringData"] = target["stringData"]
    return patch


async def apply(client: KubeClient, desired: Obj) -> Applied:
    path = path_of(desired)
    live = await client.get(path)
    if live is None:
        meta = desired["metadata"]
        try:
            await client.create(
                collection_path(desired["apiVersion"], desired["kind"], meta["namespace"]), with_last_applied(desired)
            )
            return Applied.CREATED
        except ApiError as exc:
            if exc.status != 409:
                raise
            # Made in between (a concurrent reconcile): fall through and compare with it.
            live = await client.get(path)
            if live is None:
                raise
    live_hash = (live.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)
    if live_hash == desired["metadata"]["annotations"][SPEC_HASH]:
        return Applied.UNCHANGED
    await client.merge_patch(path, patch_for(live, desired))
    return Applied.PATCHED
