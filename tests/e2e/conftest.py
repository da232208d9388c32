"""End-to-end tests on a real kind cluster (pytest-kind), skipped where they cannot run.

pytest-kind downloads kind and kubectl when its fixture is set up and then fails without
Docker. So the decision is made here, at collection: without a `kind` binary, a `kubectl`
binary and a Docker daemon that answers `docker info`, every test in this folder is skipped
with the reason, and no fixture (and no download) ever runs. Set PGFLEET_E2E_REQUIRED=1
to turn that skip into an error (the CI job does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE = "pgfleet:dev"  # the tag deploy/kustomization.yaml deploys


@cache
def missing_prerequisite() -> str | None:
    for tool in ("kind", "kubectl", "docker"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (the kind end-to-end suite needs kind, kubectl and Docker)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s: no usable Docker daemon"
    if info.returncode != 0:
        first = (info.stderr or info.stdout).strip().splitlines()[:1]
        return f"`docker info` failed (exit {info.returncode}): no usable Docker daemon ({' '.join(first)})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    if not ours:
        return
    reason = missing_prerequisite()
    if reason is None:
        return
    if os.environ.get("PGFLEET_E2E_REQUIRED"):
        # In the e2e CI job a skip would be a green run that tested nothing.
        raise pytest.UsageError(f"PGFLEET_E2E_REQUIRED is set but {reason}")
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[object]:
    """A kind cluster with the pgfleet image built and loaded, and the operator deployed."""
    from pytest_kind import KindCluster

    kind, kubectl = shutil.which("kind"), shutil.which("kubectl")
    assert kind and kubectl  # checked at collection
    subprocess.run(["docker", "build", "-t", IMAGE, str(REPO)], check=True)
    kc = KindCluster(
        request.config.getoption("cluster_name"),
        kind_path=Path(kind),
        kubectl_path=Path(kubectl),
    )
    kc.create()
    try:
        kc.load_docker_image(IMAGE)
        kc.kubectl("apply", "-k", str(REPO / "deploy"))
        kc.kubectl("-n", "pgfleet-system", "rollout", "status", "deployment/pgfleet-operator", "--timeout=180s")
        yield kc
    finally:
        if not request.config.getoption("keep_cluster"):
            kc.delete()
