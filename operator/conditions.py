"""Status conditions, following the Kubernetes conventions (`metav1.Condition`).

`lastTransitionTime` moves only when a condition's status flips, so `kubectl describe`
shows since when something has been wrong, not when the operator last looked.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

READY = "Ready"
DATABASE_REACHABLE = "DatabaseReachable"
BUDGET_ENFORCED = "BudgetEnforced"
ORDER = (READY, DATABASE_REACHABLE, BUDGET_ENFORCED)

Condition = dict[str, Any]


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: bool | None, reason: str, message: str, *, generation: int | None, at: str
) -> Condition:
    word = "Unknown" if status is None else ("True" if status else "False")
    cond: Condition = {"type": type_, "status": word, "reason": reason, "message": message, "lastTransitionTime": at}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge(previous: Iterable[Condition], updates: Iterable[Condition]) -> list[Condition]:
    """The new condition list: updates win, but keep the old transition time if status is unchanged."""
    merged = {cond["type"]: dict(cond) for cond in previous if isinstance(cond, dict) and "type" in cond}
    for cond in updates:
        old = merged.get(cond["type"])
        new = dict(cond)
        if old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        merged[cond["type"]] = new
    ordered = [merged.pop(name) for name in ORDER if name in merged]
    return ordered + [merged[name] for name in sorted(merged)]


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    for cond in conditions:
        if isinstance(cond, dict) and cond.get("type") == type_:
            return cond
    return None


def flipped_to_false(previous: Iterable[Condition], new: Condition) -> bool:
    """Whether `new` reports a problem the previous status did not (for one Event, not one per tick)."""
    if new["status"] != "False":
        return False
    old = find(previous, new["type"])
    return old is None or old.get("status") != "False" or old.get("reason") != new["reason"]
