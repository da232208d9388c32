"""Hold many idle client connections open against a PostgreSQL-speaking server.

Run as its own process (`python -m pgfleet.devtools.idleclients --port P --count N`):
it raises its open-file limit, opens N connections (a bounded number of handshakes at
a time), and for each sends a StartupMessage, answers nothing but trust/ok
authentication, and waits for ReadyForQuery. It then prints one line
`ready <connected> <failed> <seconds> [first error]` on stdout and holds the
connections idle until its stdin closes or it gets SIGTERM/SIGINT, then closes them.

`IdleClients` is the parent's side: start it, wait for the ready line, stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.startup import build_startup_message

from .procs import raise_nofile, stop_process


class LoginFailed(Exception):
    """The server did not let this client in; the message is the server's (or why)."""


def _error_text(body: bytes) -> str:
    fields = backend.parse_error_fields(body)
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '?')}: {fields.get('M', '')}"


async def login(host: str, port: int, user: str, dbname: str, timeout: float) -> asyncio.StreamWriter:
    """Open one connection and complete startup with trust auth; return the idle connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(build_startup_message({"user": user, "database": dbname, "application_name": "idleclients"}))
        async with asyncio.timeout(timeout):
            while True:
                header = await reader.readexactly(5)
                kind, length = header[:1], int.from_bytes(header[1:], "big")
                body = await reader.readexactly(length - 4)
                if kind == b"Z":
                    return writer
                if kind == b"E":
                    raise LoginFailed(_error_text(body))
                if kind == b"R" and (code := backend.parse_authentication(body).code) != backend.AUTH_OK:
                    raise LoginFailed(f"server asks for authentication {code}; only trust is supported")
    except BaseException:
        writer.close()
        raise


async def hold(host: str, port: int, user: str, dbname: str, count: int, parallel: int, timeout: float) -> None:
    started = time.monotonic()
    gate = asyncio.Semaphore(parallel)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                writers.append(await login(host, port, user, dbname, timeout))
            except (OSError, EOFError, TimeoutError, LoginFailed, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.monotonic() - started
    first = f" {errors[0]}" if errors else ""
    print(f"ready {len(writers)} {len(errors)} {elapsed:.2f}{first}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # stdin closing (EOF) makes it readable
    await stop.wait()
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.write(frontend.TERMINATE)
            writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--dbname", default="postgres")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per login")
    opts = parser.parse_args(argv)
    raise_nofile(opts.count + 256)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(hold(opts.host, opts.port, opts.user, opts.dbname, opts.count, opts.parallel, opts.timeout))


@dataclass
class Ready:
    connected: int
    failed: int
    seconds: float
    first_error: str | None


class IdleClients:
    """The parent's handle on an idle-clients process (use as a context manager)."""

    def __init__(self, host: str, port: int, count: int, *, user: str = "postgres", dbname: str = "postgres") -> None:
        self.count = count
        self.argv = [
            sys.executable, "-m", "pgfleet.devtools.idleclients",
            "--host", host, "--port", str(port), "--count", str(count), "--user", user, "--dbname", dbname,
        ]  # fmt: skip
        self.popen: subprocess.Popen[str] | None = None

    def start(self) -> IdleClients:
        raise_nofile(self.count + 256)
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        return self

    def wait_ready(self, timeout: float = 300.0) -> Ready:
        """Wait for the `ready` line; RuntimeError if the process dies or overstays `timeout`."""
        assert self.popen is not None and self.popen.stdout is not None
        readable, _, _ = select.select([self.popen.stdout], [], [], timeout)
        line = self.popen.stdout.readline() if readable else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"idle clients did not report ready (exit code {self.popen.poll()}): {line.strip()!r}")
        parts = line.split(maxsplit=4)
        return Ready(int(parts[1]), int(parts[2]), float(parts[3]), parts[4].strip() if len(parts) > 4 else None)

    def stop(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(OSError):
            if self.popen.stdin:
                self.popen.stdin.close()
        stop_process(self.popen, timeout=15, sig=signal.SIGTERM)

    def __enter__(self) -> IdleClients:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
    os._exit(0)  # skip closing 10,000 transports one by one at interpreter exit
