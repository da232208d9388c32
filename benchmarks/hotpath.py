"""Python cost of one pooled transaction, without sockets.

Drives the real ClientConnection/ServerConnection/Pool code with transports that only
record writes, so what is measured is the proxy's own work per transaction (framing,
pooling, linking), not the kernel's. Socket costs come on top; benchmarks/run.py measures
the whole.

    .venv/bin/python benchmarks/hotpath.py [--transactions N] [--clients N]
    make compiled && PYTHONPATH=build/compiled .venv/bin/python benchmarks/hotpath.py   # the compiled build

Instructions per transaction, which the machine's load does not change: the difference
of two lengths under callgrind, e.g. (N = 2000, then 12000; divide by 10000)

    PYTHONPATH=build/compiled valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python -P benchmarks/hotpath.py --queued-only --modes extended \
        --queued-clients 200 --repeat 1 --transactions N
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


def idle_server(pool: Any) -> ServerConnection:
    """A logged-in server in the pool's idle list, writing to nowhere."""
    server = ServerConnection(pool)
    server.connection_made(NullTransport())  # type: ignore[arg-type]
    server._login_reader = None
    server.params = dict(SERVER_PARAMS)
    server.tracked_params = {k: v for k, v in SERVER_PARAMS.items() if k != "server_version"}
    server.state = ServerState.IDLE
    pool.idle.append(server)
    return server


class Bench:
    """A pooler with `servers` idle servers in one pool and `clients` idle clients of it,
    and the request and answer of one transaction in `mode` (simple or extended)."""

    def __init__(self, clients: int, servers: int, mode: str) -> None:
        config = parse_config({"auth_type": "trust", "default_pool_size": servers, "databases": {"app": {}}})
        self.pooler = Pooler(config)
        self.pool = pool = self.pooler.get_pool("app", "postgres")
        pool.server_params = dict(SERVER_PARAMS)
        self.links = [idle_server(pool) for _ in range(servers)]
        shared = dict(self.links[0].tracked_params)
        self.conns = []
        for _ in range(clients):
            client = ClientConnection(self.pooler)
            client.transport = NullTransport()  # type: ignore[assignment]
            client.state = ClientState.IDLE
            client.pool = pool
            client.params = shared
            self.conns.append(client)
        if mode == "extended":
            self.request = extended_request("SELECT abalance FROM pgbench_accounts WHERE aid = $1;")
            self.response = extended_response()
        else:
            self.request = frontend.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
            self.response = select_response()

    async def per_transaction(self, transactions: int, elapsed: float) -> float:
        """µs per transaction, once every transaction is counted; the pooler is stopped."""
        assert self.pool.stats.xact_count == transactions, self.pool.stats.xact_count
        await self.pooler.stop()
        return elapsed / transactions * 1e6


async def measure(transactions: int, clients: int, mode: str) -> float:
    bench = Bench(clients, 1, mode)
    conns, server, request, response = bench.conns, bench.links[0], bench.request, bench.response
    started = time.process_time()
    for i in range(transactions):
        client = conns[i % clients]
        client.data_received(request)
        server.data_received(response)
    return await bench.per_transaction(transactions, time.process_time() - started)


async def measure_queued(transactions: int, clients: int, servers: int, mode: str) -> float:
    """As `measure`, with `servers` servers shared by more clients: every transaction queues
    (pgbench -c 50/200 through a pool of 20), the answered client asking again at once."""
    bench = Bench(clients, servers, mode)
    links, request, response = bench.links, bench.request, bench.response
    for client in bench.conns:
        client.data_received(request)
    started = time.process_time()
    for i in range(transactions):
        server = links[i % servers]
        answered = server.client
        assert answered is not None
        server.data_received(response)
        answered.data_received(request)
    return await bench.per_transaction(transactions, time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--servers", type=int, default=20, help="pool size of the queued case")
    parser.add_argument("--queued-clients", default="50,200", help="client counts of the queued case")
    parser.add_argument("--modes", default="simple,extended")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, the best reported")
    parser.add_argument(
        "--queued-only", action="store_true", help="only the queued case (for instruction counts under callgrind)"
    )
    args = parser.parse_args()
    queued = [int(c) for c in args.queued_clients.split(",") if c]
    head = " | ".join(f"{c} clients, {args.servers} servers" for c in queued)
    print(f"| protocol | µs of Python per transaction ({BUILD}) | {head} |\n|---|---|{'---|' * len(queued)}")
    for mode in args.modes.split(","):
        best = (
            None
            if args.queued_only
            else min(asyncio.run(measure(args.transactions, args.clients, mode)) for _ in range(args.repeat))
        )
        cells = [
            min(asyncio.run(measure_queued(args.transactions, c, args.servers, mode)) for _ in range(args.repeat))
            for c in queued
        ]
        first = "—" if best is None else f"{best:.2f}"
        print(f"| {mode} | {first} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
