"""The floor of a login for a Python server on uvloop: canned answers, nothing else.

A uvloop server that answers `pgbench -S -C` as a pooler would, from bytes made once:
'N' to the SSLRequest, AuthenticationOk and a welcome (ParameterStatus, BackendKeyData,
ReadyForQuery) to the startup packet, one row to the SELECT, and closes on Terminate. No
parsing beyond a message's first byte, no pool, no server, no password. What it costs per
login (uvloop's accept, transport and protocol set-up, a few reads and writes, the close)
is what any asyncio/uvloop pooler pays before doing a pooler's work; `login.py --variant
floor` runs it beside the poolers.

    .venv/bin/python -P benchmarks/loginfloor.py --port 6500
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from pgfleet.pooler.protocol import backend

WELCOME = b"".join(
    [
        backend.authentication_ok(),
        *(
            backend.parameter_status(name, value)
            for name, value in {
                "application_name": "pgbench",
                "client_encoding": "UTF8",
                "DateStyle": "ISO, MDY",
                "integer_datetimes": "on",
                "IntervalStyle": "postgres",
                "is_superuser": "on",
                "server_encoding": "UTF8",
                "server_version": "15.0",
                "session_authorization": "postgres",
                "standard_conforming_strings": "on",
                "TimeZone": "UTC",
            }.items()
        ),
        backend.backend_key_data(1234, 5678),
        backend.ready_for_query(),
    ]
)
# One row holding 1: also what pgbench reads as the scale (its count of pgbench_branches).
REPLY = (
    backend.row_description([("abalance", 23)])
    + backend.data_row(["1"])
    + backend.command_complete("SELECT 1")
    + backend.ready_for_query()
)
# pgbench's look at pgbench_accounts' partitions as it starts: one table, not partitioned.
PARTITIONS = (
    backend.row_description([("n", 23), ("partstrat", 18), ("count", 20)])
    + backend.data_row(["1", None, "0"])
    + backend.command_complete("SELECT 1")
    + backend.ready_for_query()
)


class CannedLogin(asyncio.Protocol):
    """SSLRequest → 'N'; startup packet → the welcome; Query → one row; Terminate → close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not self.started:
            if data[4:8] == b"\x04\xd2\x16\x2f":  # SSLRequest's code
                transport.write(b"N")
                return
            self.started = True
            transport.write(WELCOME)
        elif data[0] == ord("Q"):
            transport.write(PARTITIONS if b"partstrat" in data else REPLY)
        elif data[0] == ord("X"):
            transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedLogin, "127.0.0.1", port, reuse_address=True, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
