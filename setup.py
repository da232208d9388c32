"""The build's one dynamic part: the pooler's hot path compiled with mypyc, when asked.

Everything else about the distribution is in pyproject.toml. With PGFLEET_COMPILE=1 the
modules every pooled transaction passes through are compiled to C extensions by mypyc
(the compiler that ships with mypy), which more than halves their Python cost; their .py
sources stay in the wheel beside them and run wherever the extensions are absent. The
image builds this way; `make compiled` builds it for the tests and benchmarks. It needs
mypy and a C compiler at build time only, so it is built without pip's build isolation:

    PGFLEET_COMPILE=1 pip install --no-build-isolation .
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

# Per transaction: client and server state machines, the pool, statement tracking, the
# SQL scan, statistics, the turns a long read yields. Per login (a serverless crowd logs
# in for every transaction or two): password checks, parameters, hba rules, the worker's
# cancel keys, the startup and backend messages, and the pooler's client bookkeeping
# (accept, limits, cancel keys, the pool lookup, logout). Nothing outside this list is
# compiled. A compiled module checks the types it declares: a value the event loop
# hands over whose class differs from the stubs' (uvloop's lists where asyncio's are
# tuples) is read through Any.
HOT_MODULES = (
    "client",
    "server",
    "pool",
    "prepared",
    "sqlscan",
    "stats",
    "turns",
    "auth",
    "params",
    "hba",
    "shares",
    "pooler",
    "protocol/startup",
    "protocol/backend",
    "protocol/framing",
)


def _compiled_extensions() -> list[object]:
    from mypyc.build import mypycify

    root = Path(__file__).resolve().parent
    # mypyc names a module after its path, and the package-dir mapping (pooler/ ->
    # pgfleet.pooler) is setuptools' alone: give it a tree that spells the import names.
    tree = root / "build" / "mypyc-src"
    package = tree / "pgfleet"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    link = package / "pooler"
    # Relative and made afresh, so that a copied tree never compiles another tree's sources.
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..", "..", "..", "pooler"), target_is_directory=True)
    os.environ["MYPYPATH"] = str(tree)
    # Not pyproject's [tool.mypy]: its plugins and stubs are `make typecheck`'s business,
    # and the build needs only mypy (third-party imports it cannot see are typed Any).
    config = tree / "mypy.ini"
    config.write_text("[mypy]\n")
    options = ["--config-file", str(config), "--explicit-package-bases", "--ignore-missing-imports", "--no-incremental"]
    paths = [str(link / f"{name}.py") for name in HOT_MODULES]
    return list(
        mypycify(
            [*options, *paths],
            target_dir=str(root / "build" / "mypyc"),
            opt_level="3",
        )
    )


def _building() -> bool:
    # pip runs this file for the metadata too; mypyc's whole type check is wasted there.
    return os.environ.get("PGFLEET_COMPILE") == "1" and not {"egg_info", "dist_info"} & set(sys.argv[1:])


setup(ext_modules=_compiled_extensions() if _building() else [])
