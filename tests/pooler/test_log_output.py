"""The pooler's log output: log_connections lines, written in batches, look as before and come promptly."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
from collections.abc import Callable

import asyncpg
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.logoutput import BatchingStreamHandler, StampCachingFormatter
from pgfleet.pooler.protocol.startup import build_startup_message

from .conftest import PoolerProcess

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Stream:
    """A stream that keeps each write() apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None: ...


def record(
    created: float, message: str = "login: %s@%s", args: tuple[str, ...] = ("postgres", "app")
) -> logging.LogRecord:
    rec = logging.LogRecord("pgfleet.client", logging.INFO, "", 0, message, args, None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


def test_lines_look_as_logging_formats_them() -> None:
    # The same text as logging's own Formatter, across second boundaries and back again.
    cached, plain = StampCachingFormatter(FORMAT), logging.Formatter(FORMAT)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25, 1_800_000_000.0):
        assert cached.format(record(created)) == plain.format(record(created))


async def test_the_lines_of_one_loop_turn_go_out_in_one_write_at_its_end() -> None:
    stream = Stream()
    handler = BatchingStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    for user in ("a", "b", "c"):
        handler.handle(record(1_700_000_000.0, f"login: {user}", ()))
    assert stream.writes == []  # still this turn
    await asyncio.sleep(0)
    assert stream.writes == ["login: a\nlogin: b\nlogin: c\n"]
    handler.handle(record(1_700_000_000.0, "logout", ()))
    handler.close()  # closed before its turn ends: nothing is lost
    assert stream.writes[1:] == ["logout\n"]


def test_outside_a_running_loop_a_line_goes_out_at_once() -> None:
    stream = Stream()
    handler = BatchingStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(record(1_700_000_000.0, "stopped", ()))
    assert stream.writes == ["stopped\n"]


async def test_log_connections_lines_come_promptly(pooler_process: Callable[..., PoolerProcess]) -> None:
    proc = pooler_process(auth_type="trust", log_connections=True, log_disconnections=True)
    conn = await asyncpg.connect(host="127.0.0.1", port=proc.port, user="postgres", database="app")
    try:
        assert await conn.fetchval("SELECT 1") == 1
        # Written at the end of the loop turn that logged it, with nothing else happening after.
        login = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pgfleet\.client: login: postgres@app from 127\.0\.0\.1:\d+$", re.M)  # fmt: skip
        await wait_until(lambda: login.search(proc.log()) is not None)
    finally:
        await conn.close()
    await wait_until(lambda: "INFO pgfleet.pooler: logout: postgres@app from 127.0.0.1:" in proc.log())


async def test_the_logout_line_says_the_address_without_a_login_line(
    pooler_process: Callable[..., PoolerProcess],
) -> None:
    """log_disconnections alone: the peer's address, which no login line asked for, is in
    the logout line, also of a client that went away with a reset (after which the
    kernel no longer tells a socket's peer)."""
    proc = pooler_process(auth_type="trust", log_connections=False, log_disconnections=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    try:
        writer.write(build_startup_message({"user": "postgres", "database": "app"}))
        async with asyncio.timeout(10):
            await reader.readuntil(b"Z\x00\x00\x00\x05I")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # the close resets
    finally:
        writer.close()
    logout = re.compile(r"INFO pgfleet\.pooler: logout: postgres@app from 127\.0\.0\.1:[1-9]\d*$", re.M)
    await wait_until(lambda: logout.search(proc.log()) is not None)
    assert "login: postgres@app" not in proc.log()
