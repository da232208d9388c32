"""Fixtures that start a pooler in front of the session's PostgreSQL.

`start_pooler(**settings)` runs a Pooler in the test's own event loop (so tests can look
inside it and change its limits); clients reach it over TCP on 127.0.0.1 as they would
in production. `pooler_process` runs the real `pgfleet-pooler` command for signal tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from pgfleet.devtools.tempdb import PASSWORDS, TempPostgres, free_port
from pgfleet.pooler.compiled import COMPILED_LABEL
from pgfleet.pooler.config import PoolerConfig, parse_config
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.userlist import dump_userlist

USERLIST = dump_userlist({**PASSWORDS, "postgres": ""})

StartPooler = Callable[..., Awaitable[Pooler]]


def pooler_settings(pg: TempPostgres, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text(USERLIST)
    settings: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": free_port(),
        "auth_type": "md5",
        "auth_file": str(auth_file),
        "default_pool_size": 5,
        "max_client_conn": 1000,
        "server_login_retry": 1,
        "log_connections": False,
        "log_disconnections": False,
        "databases": {
            "postgres": {"host": pg.host, "port": pg.port},
            "app": {"host": pg.host, "port": pg.port},
        },
    }
    for key, value in overrides.items():
        if key == "databases":
            settings["databases"].update(value)
        else:
            settings[key] = value
    return settings


@pytest.fixture
async def start_pooler(pg: TempPostgres, tmp_path: Path) -> AsyncIterator[StartPooler]:
    started: list[Pooler] = []

    async def start(**overrides: Any) -> Pooler:
        config: PoolerConfig = parse_config(pooler_settings(pg, tmp_path, **overrides))
        pooler = Pooler(config)
        await pooler.start()
        started.append(pooler)
        return pooler

    yield start
    for pooler in started:
        await pooler.stop()
    # Give closed sockets a turn of the loop so that no transport outlives the test.
    await asyncio.sleep(0)


@pytest.fixture
def fresh_db(pg: TempPostgres) -> Iterator[str]:
    """A database of this test's own, so pg_stat_activity counts only this test's backends.

    Point the pooler's `app` at it: `start_pooler(databases={"app": {..., "dbname": fresh_db}})`
    (or use `own_app(pg, fresh_db)`).
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.sql(f"CREATE DATABASE {name}")
    yield name
    pg.sql(f"DROP DATABASE {name} WITH (FORCE)")


def own_app(pg: TempPostgres, dbname: str) -> dict[str, Any]:
    """`databases` override sending the client-visible `app` to `dbname`."""
    return {"app": {"host": pg.host, "port": pg.port, "dbname": dbname}}


class PoolerProcess:
    """The real `pgfleet-pooler` command in a subprocess."""

    def __init__(self, config_path: Path, settings: dict[str, Any]) -> None:
        self.config_path = config_path
        self.settings = settings
        self.port: int = settings["listen_port"]
        self.log_path = config_path.with_suffix(".log")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgfleet.pooler", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            log = self.log_path.read_text()
            if "ready on" in log:
                if os.environ.get("PGFLEET_EXPECT_COMPILED") == "1":
                    # `make pytest-compiled`: a pooler from the sources would void the run.
                    assert f"{COMPILED_LABEL})" in log, log  # "(hot path compiled)", "(2 workers, hot path compiled)"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"pooler exited early:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        raise TimeoutError(f"pooler not ready:\n{self.log_path.read_text()}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def pooler_process(pg: TempPostgres, tmp_path: Path) -> Iterator[Callable[..., PoolerProcess]]:
    running: list[PoolerProcess] = []

    def start(**overrides: Any) -> PoolerProcess:
        settings = pooler_settings(pg, tmp_path, **overrides)
        path = tmp_path / f"pooler-{len(running)}.yaml"
        path.write_text(yaml.safe_dump(settings))
        proc = PoolerProcess(path, settings)
        running.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in running:
        proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client for the pooler's HTTP port."""
    async with aiohttp.ClientSession() as session:
        yield session
