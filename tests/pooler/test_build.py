"""The two builds of the pooler: the image compiles with the mypyc the tests ran."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pgfleet.pooler import compiled

ROOT = Path(__file__).resolve().parents[2]


def test_image_compiles_with_the_pinned_mypy() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pinned = [req.split("==", 1)[1] for req in extras if re.match(r"mypy\s*==", req)]
    image = re.findall(r"^ARG MYPY_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert pinned and image == pinned, f"pyproject pins mypy {pinned}, the Dockerfile builds with {image}"


def test_the_build_named_is_the_one_loaded() -> None:
    # The ready line's claim: the hot-path modules load from shared objects exactly when
    # `compiled` says so (it looks at where they would load from, not at the loaded ones).
    from pgfleet.pooler import client, pool, server

    loaded_compiled = [not str(module.__file__).endswith(".py") for module in (client, server, pool)]
    assert loaded_compiled == [compiled.COMPILED] * 3
