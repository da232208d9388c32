"""Python cost of one pooled transaction, without sockets.

Drives the real ClientConnection/ServerConnection/Pool code with transports that only
record writes, so what is measured is the proxy's own work per transaction (framing,
pooling, linking), not the kernel's. Socket costs come on top; benchmarks/run.py measures
the whole.

    .venv/bin/python benchmarks/hotpath.py [--transactions N] [--clients N]
    make compiled && PYTHONPATH=build/compiled .venv/bin/python benchmarks/hotpath.py   # the compiled build
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from pgfleet.pooler.client import ClientConnection, ClientState
from pgfleet.pooler.compiled import BUILD
from pgfleet.pooler.config import parse_config
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.framing import frame
from pgfleet.pooler.server import ServerConnection, ServerState

SERVER_PARAMS = {
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "IntervalStyle": "postgres",
    "standard_conforming_strings": "on",
    "application_name": "",
    "server_version": "15.0",
}


class NullTransport:
    """Accepts writes and flow-control calls, sends nothing."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def select_response() -> bytes:
    row_desc = backend.row_description([("abalance", 23)])
    return row_desc + backend.data_row(["0"]) + backend.command_complete("SELECT 1") + backend.ready_for_query()


def extended_request(sql: str) -> bytes:
    parse = frame(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
    bind = frame(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0512345\x00\x00")
    describe = frame(b"D", b"P\x00")
    execute = frame(b"E", b"\x00\x00\x00\x00\x00")
    return parse + bind + describe + execute + frontend.SYNC


def extended_response() -> bytes:
    return (
        frame(b"1")
        + frame(b"2")
        + backend.row_description([("abalance", 23)])
        + backend.data_row(["0"])
        + backend.command_complete("SELECT 1")
        + backend.ready_for_query()
    )


async def measure(transactions: int, clients: int, mode: str) -> float:
    config = parse_config({"auth_type": "trust", "default_pool_size": 1, "databases": {"app": {}}})
    pooler = Pooler(config)
    pool = pooler.get_pool("app", "postgres")
    pool.server_params = dict(SERVER_PARAMS)
    server = ServerConnection(pool)
    server.connection_made(NullTransport())  # type: ignore[arg-type]
    server._login_reader = None
    server.params = dict(SERVER_PARAMS)
    server.tracked_params = {k: v for k, v in SERVER_PARAMS.items() if k != "server_version"}
    server.state = ServerState.IDLE
    pool.idle.append(server)
    conns = []
    for _ in range(clients):
        client = ClientConnection(pooler)
        client.transport = NullTransport()  # type: ignore[assignment]
        client.state = ClientState.IDLE
        client.pool = pool
        client.params = dict(server.tracked_params)
        conns.append(client)
    sql = (
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        if mode == "extended"
        else ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
    )
    request = extended_request(sql) if mode == "extended" else frontend.query(sql)
    response = extended_response() if mode == "extended" else select_response()
    started = time.perf_counter()
    for i in range(transactions):
        client = conns[i % clients]
        client.data_received(request)
        server.data_received(response)
    elapsed = time.perf_counter() - started
    assert pool.stats.xact_count == transactions, pool.stats.xact_count
    await pooler.stop()
    return elapsed / transactions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    print(f"| protocol | µs of Python per transaction ({BUILD}) |\n|---|---|")
    for mode in ("simple", "extended"):
        best = min(asyncio.run(measure(args.transactions, args.clients, mode)) for _ in range(3))
        print(f"| {mode} | {best:.2f} |")


if __name__ == "__main__":
    main()
