"""The CRD: generated from the models, structural, and admitting exactly the specs it should."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pgfleet.operator import cli, crd, model

from .crdcheck import CRD_PATH, admit, committed_crd, schema

REPO = Path(__file__).resolve().parents[2]


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "pgfleet.io/v1alpha1",
        "kind": "PgPool",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "database": {"host": "db", "dbname": "app", "credentialsSecret": "creds"},
            "budget": {"maxBackends": 20},
        },
    }


def test_committed_crd_is_what_the_models_generate() -> None:
    assert CRD_PATH.read_text() == crd.crd_yaml(), "crds/pgpool.yaml is stale: run `make crd`"


def test_cli_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == CRD_PATH.read_text()


def test_names_scope_and_categories() -> None:
    spec = committed_crd()["spec"]
    assert committed_crd()["metadata"]["name"] == "pgpools.pgfleet.io"
    assert spec["group"] == "pgfleet.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "PgPool" and spec["names"]["plural"] == "pgpools"
    assert spec["names"]["shortNames"] == ["pgp"]
    assert spec["names"]["categories"] == ["pgfleet"]  # `kubectl get pgfleet`


def _schema_at(json_path: str) -> dict[str, Any]:
    node = schema()
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns_point_at_typed_fields() -> None:
    columns = committed_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns] == ["MODE", "READY", "REPLICAS", "BUDGET", "BACKENDS", "CLIENTS", "AGE"]
    # BACKENDS is the fleet's own (its pods' PIDs), not every backend of its role.
    paths = {c["name"].upper(): c["jsonPath"] for c in columns}
    assert (paths["BUDGET"], paths["BACKENDS"]) == (".status.budget.total", ".status.budget.fleetBackends")
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        field = _schema_at(column["jsonPath"])
        assert field["type"] == column["type"], column


def test_status_and_scale_subresources() -> None:
    sub = committed_crd()["spec"]["versions"][0]["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert _schema_at(".spec.replicas")["type"] == "integer"
    assert _schema_at(".status.replicas")["type"] == "integer"
    assert _schema_at(".status.selector")["type"] == "string"  # a string, as HPAs read it


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def test_schema_is_structural() -> None:
    for path, node in _walk(schema()):
        if path.endswith(("/default", "/x-kubernetes-validations")) or "/default/" in path:
            continue
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title"} & node.keys(), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if path.endswith("/properties") or "/x-kubernetes-validations" in path or path.endswith("/items/properties"):
            continue
        if "properties" in node or "items" in node or "additionalProperties" in node:
            assert "type" in node, f"{path} has no type"


def _examples() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((REPO / "deploy" / "examples").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "PgPool"]
    return docs


def test_there_is_an_example() -> None:
    assert _examples()


@pytest.mark.parametrize("example", _examples(), ids=lambda e: e["metadata"]["name"])
def test_every_example_is_admitted(example: dict[str, Any]) -> None:
    stored, errors = admit(example)
    assert errors == []
    model.PgPoolSpec.model_validate(stored["spec"])  # and the operator can read what was stored


def test_defaults_match_the_models() -> None:
    stored, errors = admit(minimal())
    assert errors == []
    assert stored["spec"]["poolMode"] == "transaction" and stored["spec"]["replicas"] == 2
    assert stored["spec"]["rollout"] == {"maxSurge": 1, "maxUnavailable": 0}
    parsed = model.PgPoolSpec.model_validate(minimal()["spec"]).model_dump(by_alias=True, mode="json")

    def subset(small: Any, big: Any) -> bool:
        if isinstance(small, dict):
            return all(k in big and subset(v, big[k]) for k, v in small.items())
        return bool(small == big)

    assert subset(stored["spec"], parsed), "the schema defaults a field differently from the model"


def _with(change: dict[str, Any]) -> dict[str, Any]:
    obj = minimal()

    def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in patch.items():
            if value is None:
                into.pop(key, None)
            elif isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(obj["spec"], change)
    return obj


REJECTED = [
    # (what is wrong, spec change, words the refusal must contain)
    ("no database", {"database": None}, "'database' is a required property"),
    ("empty host", {"database": {"host": ""}}, "host"),
    ("port out of range", {"database": {"port": 70000}}, "70000"),
    ("unknown pool mode", {"poolMode": "fancy"}, "'fancy' is not one of"),
    ("negative replicas", {"replicas": -1}, "-1"),
    ("percent above 100", {"budget": {"maxBackendsPercent": 101}}, "101"),
    ("no budget at all", {"budget": None}, "'budget' is a required property"),
    ("budget without a size", {"budget": {"maxBackends": None, "reserve": 2}}, "budget needs maxBackends"),
    ("reserve eats the budget", {"budget": {"maxBackends": 10, "reserve": 10}}, "reserve must be below"),
    ("too small for the pods", {"replicas": 5, "budget": {"maxBackends": 5}}, "at least replicas + rollout.maxSurge"),
    ("rollout cannot progress", {"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "cannot both be 0"),
    ("bad service type", {"service": {"type": "ExternalName"}}, "ExternalName"),
    ("negative timeout", {"pooler": {"queryWaitTimeout": -1}}, "-1"),
    ("no workers", {"pooler": {"workers": 0}}, "0 is less than the minimum of 1"),
    ("too many workers", {"pooler": {"workers": 65}}, "65 is greater than the maximum of 64"),
    ("empty auth query", {"clientAuth": {"authQuery": {"query": ""}}}, "query"),
    (
        "client certificate without TLS",
        {"tls": {"serverCertSecret": "db-client", "serverSslmode": "disable"}},
        "tls.serverCertSecret needs a tls.serverSslmode other than disable",
    ),
    (
        "fewer clients than workers",
        {"pooler": {"workers": 8, "maxClientConn": 7}},
        "pooler.maxClientConn must be at least pooler.workers",
    ),
]


@pytest.mark.parametrize(("change", "words"), [(c, w) for _, c, w in REJECTED], ids=[r[0] for r in REJECTED])
def test_invalid_specs_are_refused_with_a_reason(change: dict[str, Any], words: str) -> None:
    _, errors = admit(_with(change))
    assert errors, "admitted"
    assert any(words in error for error in errors), errors


def test_budget_exactly_one_backend_per_pod_is_admitted() -> None:
    _, errors = admit(_with({"replicas": 3, "budget": {"maxBackends": 6, "reserve": 2}}))  # 6 - 2 >= 3 + 1
    assert errors == []


def test_percentage_budget_alone_is_admitted() -> None:
    _, errors = admit(_with({"budget": {"maxBackends": None, "maxBackendsPercent": 50}}))
    assert errors == []


# maxClientConn is split among the workers; the rule is checked on the stored (defaulted) spec.
WORKERS_ADMITTED = [
    ("default: one worker", {}),
    ("as many clients as workers", {"pooler": {"workers": 8, "maxClientConn": 8}}),
    ("workers under the default maxClientConn", {"pooler": {"workers": 64}}),
]


@pytest.mark.parametrize("change", [c for _, c in WORKERS_ADMITTED], ids=[w[0] for w in WORKERS_ADMITTED])
def test_workers_admitted_and_read_alike(change: dict[str, Any]) -> None:
    stored, errors = admit(_with(change))
    assert errors == []
    spec = model.PgPoolSpec.model_validate(stored["spec"])
    assert spec.pooler.workers == stored["spec"]["pooler"]["workers"]


def test_workers_above_max_client_conn_refused_by_the_model_too() -> None:
    # The operator must not read a spec the API server would refuse, nor refuse one it admits.
    spec = _with({"pooler": {"workers": 8, "maxClientConn": 7}})["spec"]
    with pytest.raises(ValueError, match=r"pooler\.maxClientConn must be at least pooler\.workers"):
        model.PgPoolSpec.model_validate(spec)


def test_auth_query_is_admitted_with_the_models_default_query() -> None:
    # Absent, it stays absent (off): no `default: {}` that would turn it on.
    stored, errors = admit(minimal())
    assert errors == [] and "authQuery" not in stored["spec"]["clientAuth"]
    stored, errors = admit(_with({"clientAuth": {"authQuery": {"userSecret": "lookup"}}}))
    assert errors == []
    spec = model.PgPoolSpec.model_validate(stored["spec"])
    assert spec.client_auth.auth_query is not None
    assert stored["spec"]["clientAuth"]["authQuery"]["query"] == spec.client_auth.auth_query.query
    assert "pg_shadow" in spec.client_auth.auth_query.query and spec.client_auth.auth_query.user_secret == "lookup"


def test_client_certificate_without_tls_refused_by_the_model_too() -> None:
    spec = _with({"tls": {"serverCertSecret": "db-client", "serverSslmode": "disable"}})["spec"]
    with pytest.raises(ValueError, match=r"tls\.serverCertSecret needs"):
        model.PgPoolSpec.model_validate(spec)
    _, errors = admit(_with({"tls": {"serverCertSecret": "db-client"}}))  # the default prefer
    assert errors == []
