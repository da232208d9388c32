"""The floor for a Python proxy on this machine: a uvloop forwarder that does nothing else.

Each client gets its own server connection and bytes are copied both ways unparsed: no
framing, no pooling, no statistics. Whatever tps and CPU per transaction it shows is
what any asyncio/uvloop proxy pays before doing a pooler's work; compare with the
pgfleet and PgBouncer rows of benchmarks/run.py.

    .venv/bin/python benchmarks/floor.py [--clients 50] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import uvloop
from pgfleet.devtools.pgbench import PgbenchArgs, pgbench_init, run_pgbench
from pgfleet.devtools.tempdb import TempPostgres, free_port


class _Side(asyncio.Protocol):
    """One end of a forwarded pair; writes whatever arrives to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.backlog: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.backlog.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _ClientSide(_Side):
    def __init__(self, db_port: int) -> None:
        super().__init__()
        self.db_port = db_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        server = _Side()
        server.peer = self
        await asyncio.get_running_loop().create_connection(lambda: server, "127.0.0.1", self.db_port)
        self.peer = server
        assert server.transport is not None
        for chunk in self.backlog:
            server.transport.write(chunk)
        self.backlog.clear()


async def _run(pg: TempPostgres, clients: int, duration: float) -> None:
    port = free_port()
    listener = await asyncio.get_running_loop().create_server(lambda: _ClientSide(pg.port), "127.0.0.1", port)
    before = os.times()
    result = await asyncio.to_thread(
        run_pgbench,
        "127.0.0.1",
        port,
        "postgres",
        PgbenchArgs(clients=clients, duration=duration, mode="simple", select_only=True),
    )
    after = os.times()
    listener.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    per_txn = cpu / result.transactions * 1e6 if result.transactions else float("nan")
    print("| target | tps | forwarder CPU µs/txn (user + sys) |\n|---|---|---|")
    print(f"| uvloop byte forwarder, {clients} clients | {result.tps or 0:,.0f} | {per_txn:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    with TempPostgres(max_connections=args.clients + 20) as pg:
        pgbench_init("127.0.0.1", pg.port, "postgres", scale=5)
        uvloop.run(_run(pg, args.clients, args.duration))


if __name__ == "__main__":
    main()
