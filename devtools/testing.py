"""Helpers for tests that drive real clients against a pooler on the test's own loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


def client_env(password: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PGSERVICE", None)
    if password is not None:
        env["PGPASSWORD"] = password
    return env


async def run_cmd(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run a client program (psql, pgbench) without blocking the loop the pooler runs on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or client_env()
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10, interval: float = 0.01) -> None:
    """Wait for a condition with a deadline (never a bare sleep-and-hope)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)
