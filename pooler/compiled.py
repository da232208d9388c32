"""Which build runs: the hot path compiled by mypyc (setup.py, the image's build) or the sources.

Both builds behave the same; the compiled one spends about half the Python time per
transaction. The ready line says which one runs, so that a benchmark or a test run can
tell.
"""

from __future__ import annotations

import importlib.util

# Where an extension module sits beside its source, the import system loads the extension.
_client = importlib.util.find_spec(f"{__package__}.client")
COMPILED = _client is not None and not str(_client.origin).endswith(".py")
BUILD = "hot path compiled" if COMPILED else "pure Python"
