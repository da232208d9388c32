"""`workers` > 1: the parent process that runs the worker poolers and speaks for all of them.

One CPython process forwards at most what one core's event loop can; on a machine whose
cores are shared with the database and the clients it is the bottleneck long before the
cores are busy. So the pooler can run as N worker processes sharing `listen_port`
through SO_REUSEPORT, each a whole pooler with its share of every limit (shares.py).

The supervisor owns what must stay one thing:
- signals: SIGHUP, SIGTERM, SIGINT (SIGQUIT alike), SIGUSR1 and SIGUSR2 go to every worker;
- the HTTP port (http_front.py), where /status and /metrics cover all workers and
  PUT /limits, PUT /pause and POST /drain reach all of them;
- the workers themselves: one that dies is started again, with the limits in force.

It never touches client traffic, so it adds nothing per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .compiled import BUILD
from .config import ConfigError, PoolerConfig, load_config, merge_limits
from .hba import rules_for
from .shares import WorkerSlot
from .tls import build_contexts
from .zygote import ForkedWorker, Zygote

log = logging.getLogger("pgfleet.supervisor")

_READY_TIMEOUT = 30.0  # seconds for a worker to bind and open its control socket
_RESTART_BACKOFF = 1.0
_FORWARDED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class WorkerFailed(Exception):
    """A worker could not start; the message says which and why."""


class Worker:
    """One worker process and the private socket of its control port."""

    def __init__(self, slot: WorkerSlot, argv: Sequence[str], zygote: Zygote) -> None:
        self.slot = slot
        self.argv = list(argv)  # pgfleet-pooler's arguments
        self.zygote = zygote
        self.process: ForkedWorker | None = None
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.slot.http_socket.unlink(missing_ok=True)
        self.process = await self.zygote.start(self.argv)

    async def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Until its control socket answers /healthz; WorkerFailed if it exits or times out."""
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.process.returncode is not None:
                raise WorkerFailed(f"worker {self.slot.index + 1} exited with code {self.process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session() as session, session.get("http://worker/healthz") as response:
                    if response.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise WorkerFailed(f"worker {self.slot.index + 1} did not become ready in {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def session(self, timeout: float = 10.0) -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(path=str(self.slot.http_socket))
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON or text) from the worker's control port."""
        async with self.session() as session, session.request(method, f"http://worker{path}", json=body) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class Supervisor:
    def __init__(self, config: PoolerConfig, config_path: str, worker_argv: Sequence[str], zygote: Zygote) -> None:
        self.config = config
        self.config_path = config_path
        self.worker_argv = list(worker_argv)  # the pooler's arguments, without --worker/--control-dir
        self.zygote = zygote
        self.control_dir = Path(tempfile.mkdtemp(prefix="pgfleet-workers-"))  # mode 0700
        self.workers = [
            Worker(
                slot,
                [*self.worker_argv, "--worker", f"{i}/{config.workers}", "--control-dir", str(self.control_dir)],
                zygote,
            )
            for i in range(config.workers)
            for slot in [WorkerSlot(i, config.workers, self.control_dir)]
        ]
        self.draining = False
        self.stopping = False
        # PUT /pause (or start_paused until the first one): a worker started again follows it.
        self.paused = config.start_paused
        self.loop = asyncio.get_running_loop()
        self.started_at = self.loop.time()
        self._stopped = self.loop.create_future()
        self._watchers: list[asyncio.Task[None]] = []

    # -- life cycle -------------------------------------------------------------------------------
    async def run(self) -> int:
        try:
            try:
                await self._start_all()
            except WorkerFailed as exc:
                print(f"pgfleet-pooler: cannot start: {exc}", file=sys.stderr, flush=True)
                await self._stop_all(signal.SIGINT)
                return 1
            runner = await self._start_http()
            for signum in _FORWARDED:
                self.loop.add_signal_handler(signum, self._on_signal, signum)
            self._watchers = [self.loop.create_task(self._watch(worker)) for worker in self.workers]
            print(
                f"pgfleet-pooler ready on {self.config.listen_addr}:{self.config.listen_port} "
                f"({len(self.workers)} workers, {BUILD})",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.shield(self._stopped)
            if runner is not None:
                await runner.cleanup()
            return 0
        finally:
            for task in self._watchers:
                task.cancel()
            self.zygote.close()
            shutil.rmtree(self.control_dir, ignore_errors=True)

    async def _start_all(self) -> None:
        self._save_paused()
        for worker in self.workers:
            await worker.start()
        await asyncio.gather(*(worker.wait_ready() for worker in self.workers))

    async def _start_http(self) -> Any:
        if not self.config.http_listen_port:
            return None
        from .http_front import start_front  # aiohttp's server side only when the port is on

        return await start_front(self)

    async def _watch(self, worker: Worker) -> None:
        """Wait for a worker to exit; start it again unless the pooler is going down."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping or self.draining:
                self._check_all_exited()
                return
            worker.restarts += 1
            log.error("worker %d exited with code %s; starting it again", worker.slot.index + 1, code)
            await asyncio.sleep(_RESTART_BACKOFF)
            if self.stopping or self.draining:
                self._check_all_exited()
                return
            try:
                await worker.start()  # it reads the limits in force from the control directory
                await worker.wait_ready()
                # It started from the pause file; a change since it read the file reaches it here.
                await self._put_pause(worker, self.paused)
            except (WorkerFailed, OSError) as exc:
                log.error("worker %d failed to start again: %s", worker.slot.index + 1, exc)

    def _check_all_exited(self) -> None:
        if not any(worker.alive for worker in self.workers) and not self._stopped.done():
            self._stopped.set_result(None)

    async def _stop_all(self, signum: int) -> None:
        self.stopping = True
        for worker in self.workers:
            worker.signal(signum)
        for worker in self.workers:
            if worker.process is not None:
                await worker.process.wait()

    # -- signals ----------------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGTERM:
            self.drain()
        elif signum in (signal.SIGUSR1, signal.SIGUSR2):
            for worker in self.workers:  # PAUSE / RESUME, each worker its own pools
                worker.signal(signum)
        else:
            self.stop()

    def reload(self) -> None:
        """SIGHUP: check the file here (for the HTTP port's view), then let every worker reload it."""
        try:
            new = load_config(self.config_path, workers=self.config.workers)
            build_contexts(new)  # the workers would refuse it alike
            rules_for(new)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        self.config = new
        self._limits_file.unlink(missing_ok=True)  # a reload puts the file's limits back in force
        for worker in self.workers:
            worker.signal(signal.SIGHUP)
        log.info("configuration reloaded")

    def drain(self) -> None:
        """SIGTERM or POST /drain: every worker drains; the supervisor exits when they have."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d workers", len(self.workers))
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        self._check_all_exited()

    def stop(self) -> None:
        """SIGINT: every worker stops now."""
        self.stopping = True
        for worker in self.workers:
            worker.signal(signal.SIGINT)
        self._check_all_exited()

    # -- limits -----------------------------------------------------------------------------------
    async def set_limits(self, changes: dict[str, Any]) -> list[tuple[int, int, Any]]:
        """Validate `changes` here, then apply them in every worker; (worker, status, reply) of each."""
        new = merge_limits(self.config, changes)  # ConfigError: nothing was sent anywhere
        self.config = new
        self._save_limits()
        return await asyncio.gather(*(self._put_limits(worker, changes) for worker in self.workers))

    async def _put_limits(self, worker: Worker, changes: dict[str, Any]) -> tuple[int, int, Any]:
        try:
            status, reply = await worker.request("PUT", "/limits", changes)
        except (aiohttp.ClientError, OSError) as exc:
            return worker.slot.index, 502, {"error": f"worker unreachable: {exc}"}
        return worker.slot.index, status, reply

    # -- pause ------------------------------------------------------------------------------------
    async def set_paused(self, paused: bool) -> list[tuple[int, int, Any]]:
        """PUT /pause in every worker; (worker, status, reply) of each."""
        self.paused = paused
        self._save_paused()  # first: a worker starting now must not miss it
        return await asyncio.gather(*(self._put_pause(worker, paused) for worker in self.workers))

    async def _put_pause(self, worker: Worker, paused: bool) -> tuple[int, int, Any]:
        try:
            status, reply = await worker.request("PUT", "/pause", {"paused": paused})
        except (aiohttp.ClientError, OSError) as exc:
            return worker.slot.index, 502, {"error": f"worker unreachable: {exc}"}
        return worker.slot.index, status, reply

    @property
    def _limits_file(self) -> Path:
        path = self.workers[0].slot.limits_file
        assert path is not None
        return path

    def _save_paused(self) -> None:
        """Write the pause in force where every worker reads it as it starts (start_paused's stand-in)."""
        path = self.workers[0].slot.paused_file
        assert path is not None
        temporary = path.with_suffix(".tmp")
        temporary.write_text("1" if self.paused else "0")
        temporary.replace(path)

    def _save_limits(self) -> None:
        """Write the limits in force where a worker that starts again reads them."""
        from .http import limits_in_force_config

        body = limits_in_force_config(self.config, keep_unset=True)
        temporary = self._limits_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(body))
        temporary.replace(self._limits_file)  # never half a file for a worker starting now


async def supervise(config: PoolerConfig, config_path: str, worker_argv: Sequence[str], zygote: Zygote) -> int:
    return await Supervisor(config, config_path, worker_argv, zygote).run()
