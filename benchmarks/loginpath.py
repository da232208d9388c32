"""Python cost of one login, without sockets.

Drives the real ClientConnection, Pool and Pooler code through a whole `pgbench -S -C`
login (accept, SSLRequest, startup packet, authentication, the welcome, one SELECT
through a pooled server, Terminate, teardown) with transports that only record writes,
so that what is measured is the pooler's own work per login, not the kernel's nor the
event loop's (uvloop's transport set-up and teardown come on top; `login.py` measures the
whole). For SCRAM the client's side of the exchange (two HMACs from a key computed once)
is left out of the time.

    .venv/bin/python -P benchmarks/loginpath.py [--logins N]
    make compiled && PYTHONPATH=build/compiled .venv/bin/python -P benchmarks/loginpath.py

Instructions per login, which the machine's load does not change: the difference of two
lengths under callgrind, e.g. (N = 2000, then 12000; divide by 10000)

    PYTHONPATH=build/compiled valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python -P benchmarks/loginpath.py --auth trust --repeat 1 --logins N
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import hashlib
import hmac
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pgfleet.pooler.auth import xor
from pgfleet.pooler.client import ClientConnection
from pgfleet.pooler.compiled import BUILD
from pgfleet.pooler.config import parse_config
from pgfleet.pooler.pooler import Pooler
from pgfleet.pooler.protocol import frontend
from pgfleet.pooler.protocol.framing import MessageReader
from pgfleet.pooler.protocol.startup import build_ssl_request, build_startup_message
from pgfleet.pooler.server import ServerConnection, ServerState
from pgfleet.pooler.userlist import dump_userlist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath import SERVER_PARAMS, select_response  # one canned server for both

PASSWORD = "storm-password"
USER = "postgres"


class RecordingTransport:
    """Keeps what the pooler writes; close() marks it closing (connection_lost is called by the driver)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class ScramClientSide:
    """The client's half of SCRAM-SHA-256 from a salted password computed once (no PBKDF2 per login)."""

    def __init__(self, password: str, salt: bytes, iterations: int) -> None:
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        self.client_key = hmac.digest(salted, b"Client Key", "sha256")
        self.stored_key = hashlib.sha256(self.client_key).digest()
        self.first_bare = "n=,r=" + base64.b64encode(os.urandom(18)).decode()

    def initial(self) -> bytes:
        return frontend.sasl_initial_response("SCRAM-SHA-256", ("n,," + self.first_bare).encode())

    def final(self, server_first: str) -> bytes:
        nonce = server_first.split(",", maxsplit=1)[0][2:]
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        proof = xor(self.client_key, hmac.digest(self.stored_key, auth_message, "sha256"))
        return frontend.sasl_response(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


def scram_secret(password: str, salt: bytes, iterations: int) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


# The steps of a login as the event loop calls the pooler, each timed apart with --phases.
PHASES = (
    "accept (protocol object, connection_made)",
    "SSLRequest ('N')",
    "startup packet, auth, pool, welcome",
    "SCRAM: SASLInitialResponse",
    "SCRAM: SASLResponse, welcome",
    "first query: to the server",
    "reply: to the client, server back to the pool",
    "Terminate (close)",
    "teardown (connection_lost)",
)


async def measure(
    logins: int,
    auth: str,
    log_connections: bool,
    profile: Path | None = None,
    phases: dict[str, float] | None = None,
) -> float:
    salt = os.urandom(16)
    settings: dict[str, Any] = {
        "auth_type": "trust",
        "default_pool_size": 1,
        "databases": {"bench": {}},
        "log_connections": log_connections,
        "log_disconnections": log_connections,
    }
    scram = None
    if auth == "scram":
        auth_file = Path(tempfile.mkdtemp()) / "userlist.txt"
        auth_file.write_text(dump_userlist({USER: scram_secret(PASSWORD, salt, 4096)}))
        settings.update(auth_type="scram-sha-256", auth_file=str(auth_file))
        scram = ScramClientSide(PASSWORD, salt, 4096)
    pooler = Pooler(parse_config(settings))
    pool = pooler.get_pool("bench", USER)
    pool.server_params = dict(SERVER_PARAMS)
    server = ServerConnection(pool)
    server.connection_made(RecordingTransport())  # type: ignore[arg-type]
    server._login_reader = None
    # As after the first login of a storm: the server has pgbench's application_name already.
    server.params = {**SERVER_PARAMS, "application_name": "pgbench"}
    server.tracked_params = {k: v for k, v in server.params.items() if k != "server_version"}
    server.state = ServerState.IDLE
    pool.idle.append(server)
    ssl_request = build_ssl_request()
    startup = build_startup_message({"user": USER, "database": "bench", "application_name": "pgbench"})
    query = frontend.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
    response = select_response()
    terminate = frontend.TERMINATE
    clock = time.thread_time  # CPU time: a shared machine preempts, and wall time would count it
    spent = 0.0
    profiler = cProfile.Profile() if profile is not None else None
    if phases is not None:
        return _measure_phases(logins, pooler, server, scram, ssl_request, startup, query, response, terminate, phases)
    for _ in range(logins):
        transport = RecordingTransport()
        started = clock()
        if profiler is not None:
            profiler.enable()
        client = ClientConnection(pooler)
        client.connection_made(transport)  # type: ignore[arg-type]
        client.data_received(ssl_request)
        client.data_received(startup)
        if scram is not None:
            client.data_received(scram.initial())
            reader = MessageReader()
            reader.feed(transport.out[-1])
            ((_, body),) = reader.messages()
            if profiler is not None:
                profiler.disable()
            spent += clock() - started
            final = scram.final(body[4:].decode())
            started = clock()
            if profiler is not None:
                profiler.enable()
            client.data_received(final)
        client.data_received(query)
        server.data_received(response)
        client.data_received(terminate)
        client.connection_lost(None)
        if profiler is not None:
            profiler.disable()
        spent += clock() - started
        assert transport.closing and b"Z\x00\x00\x00\x05I" in transport.out[-1], transport.out
    assert pool.stats.xact_count == logins, pool.stats.xact_count
    await pooler.stop()
    if profiler is not None and profile is not None:
        profiler.dump_stats(str(profile))
    return spent / logins * 1e6


def _measure_phases(
    logins: int,
    pooler: Pooler,
    server: ServerConnection,
    scram: ScramClientSide | None,
    ssl_request: bytes,
    startup: bytes,
    query: bytes,
    response: bytes,
    terminate: bytes,
    phases: dict[str, float],
) -> float:
    """As the loop in measure, each step timed apart: the median over the logins of each
    step's wall time (a shared machine preempts; the median leaves those logins out),
    less the clock read's own (~50 ns)."""
    clock = time.perf_counter_ns
    overhead = min(-(clock() - clock()) for _ in range(1000))
    spent: dict[str, list[int]] = {phase: [] for phase in PHASES}
    for _ in range(logins):
        transport = RecordingTransport()
        t0 = clock()
        client = ClientConnection(pooler)
        client.connection_made(transport)  # type: ignore[arg-type]
        t1 = clock()
        client.data_received(ssl_request)
        t2 = clock()
        client.data_received(startup)
        t3 = clock()
        spent[PHASES[0]].append(t1 - t0)
        spent[PHASES[1]].append(t2 - t1)
        spent[PHASES[2]].append(t3 - t2)
        if scram is not None:
            t0 = clock()
            client.data_received(scram.initial())
            t1 = clock()
            reader = MessageReader()
            reader.feed(transport.out[-1])
            ((_, body),) = reader.messages()
            final = scram.final(body[4:].decode())
            t2 = clock()
            client.data_received(final)
            t3 = clock()
            spent[PHASES[3]].append(t1 - t0)
            spent[PHASES[4]].append(t3 - t2)
        t0 = clock()
        client.data_received(query)
        t1 = clock()
        server.data_received(response)
        t2 = clock()
        client.data_received(terminate)
        t3 = clock()
        client.connection_lost(None)
        t4 = clock()
        spent[PHASES[5]].append(t1 - t0)
        spent[PHASES[6]].append(t2 - t1)
        spent[PHASES[7]].append(t3 - t2)
        spent[PHASES[8]].append(t4 - t3)
        assert transport.closing and b"Z\x00\x00\x00\x05I" in transport.out[-1], transport.out
    for phase in PHASES:
        if spent[phase]:
            phases[phase] = (statistics.median(spent[phase]) - overhead) / 1e3
    return sum(phases.values())


def _run(coro: Coroutine[Any, Any, float]) -> float:
    """On uvloop, as the pooler runs (its timers are client_login_timeout's), when installed."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=20_000)
    parser.add_argument("--auth", default="trust,scram")
    parser.add_argument("--log-connections", default="off", help="off, on (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, the best one reported")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (pure build)")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="time each step of the login apart (wall time, best of 3 runs per step) instead of the whole",
    )
    args = parser.parse_args()
    if args.phases:
        for auth in args.auth.split(","):
            best: dict[str, float] = {}
            for _ in range(args.repeat):
                run: dict[str, float] = {}
                _run(measure(args.logins, auth, False, phases=run))
                best = {k: min(v, best.get(k, v)) for k, v in run.items()}
            print(f"\n| {auth}: phase | µs per login ({BUILD}) |\n|---|---|")
            for phase, us in best.items():
                print(f"| {phase} | {us:.1f} |")
            print(f"| (sum) | {sum(best.values()):.1f} |")
        return
    print(f"| auth | log_connections | µs of Python per login ({BUILD}) |\n|---|---|---|")
    for auth in args.auth.split(","):
        for log in args.log_connections.split(","):
            best = min(_run(measure(args.logins, auth, log == "on")) for _ in range(args.repeat))
            print(f"| {auth} | {log} | {best:.1f} |")
            if args.profile:
                out = Path(tempfile.mkdtemp()) / "login.prof"
                _run(measure(args.logins, auth, log == "on", out))
                pstats.Stats(str(out)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
