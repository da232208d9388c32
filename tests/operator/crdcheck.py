"""What the API server does with a PgPool before storing it, as far as a test can do it here:
apply the schema's defaults, validate against openAPIV3Schema, then evaluate the CEL rules.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "pgpool.yaml"


@cache
def committed_crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


def schema() -> dict[str, Any]:
    return dict(committed_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Kubernetes defaulting: fill absent properties that have a default, then recurse."""
    if isinstance(value, dict) and "properties" in node:
        out = dict(value)
        for name, prop in node["properties"].items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(prop, out[name])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(node["items"], item) for item in value]
    return value


def _cel_errors(node: dict[str, Any], value: Any, path: str) -> list[str]:
    errors = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            errors.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in node.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(prop, value[name], f"{path}.{name}")
    return errors


def admit(obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The object as stored (defaults applied) and the reasons the API server would refuse it."""
    root = schema()
    defaulted = apply_defaults(root, obj)
    validator = jsonschema.Draft7Validator(root)
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in validator.iter_errors(defaulted)
    ]
    if not errors:
        errors = _cel_errors(root, defaulted, "")
    return defaulted, errors
