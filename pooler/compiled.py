"""Which build runs: the hot path compiled by mypyc (setup.py, the image's build) or the sources.

Both builds behave the same; the compiled one spends about half the Python time per
transaction. The ready line says which one runs, so that a benchmark or a test run can
tell.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

COMPILED_LABEL = "hot path compiled"
SOURCES_LABEL = "pure Python"

# Where an extension module sits beside its source, the import system loads the extension.
_client = importlib.util.find_spec(f"{__package__}.client")
COMPILED = _client is not None and str(_client.origin).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
BUILD = COMPILED_LABEL if COMPILED else SOURCES_LABEL
