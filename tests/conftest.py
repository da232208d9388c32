"""Session-wide fixtures: a real throwaway PostgreSQL, and its log after a failure."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator

import pytest
from pgfleet.devtools.tempdb import TempPostgres


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_sessionstart(session: pytest.Session) -> None:
    # A CI timeout or `kill` sends SIGTERM; turning it into KeyboardInterrupt lets pytest
    # run the fixtures' finalizers, so no throwaway PostgreSQL outlives the run.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if os.environ.get("PGFLEET_EXPECT_COMPILED") == "1":
        _require_compiled()


def _require_compiled() -> None:
    """`make pytest-compiled`: the run is void unless mypyc's modules are the ones in use."""
    from pgfleet.pooler import client, compiled

    if not compiled.COMPILED:
        raise pytest.UsageError(f"PGFLEET_EXPECT_COMPILED=1, but the pooler runs from {client.__file__}")


@pytest.fixture(scope="session")
def pg() -> Iterator[TempPostgres]:
    """One PostgreSQL for the whole run (max_connections 150)."""
    server = TempPostgres(max_connections=150)
    server.start()
    server.sql("CREATE DATABASE app")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _postgres_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    if "pg" not in request.fixturenames:
        yield
        return
    server: TempPostgres = request.getfixturevalue("pg")
    start = len(server.log())
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n--- PostgreSQL log during {request.node.name} ---\n{server.log()[start:][-8000:]}")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    # PGFLEET_TEST_UVLOOP=1 runs the whole suite on uvloop, the production loop.
    if os.environ.get("PGFLEET_TEST_UVLOOP") == "1":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
