"""`workers` > 1: the workers are forked from one process that has loaded the pooler once.

A worker started afresh (`python -m pgfleet.pooler --worker ...`) loads Python, pydantic,
aiohttp, uvloop and the pooler again: about 36 MB of private memory per worker, the same
bytes in every process (benchmarks/memory.py). Forked from a process that has loaded them,
a worker shares those pages with it (copy-on-write) and pays only for what it changes.

The supervisor cannot fork its workers itself once its event loop runs (the child would
inherit the running loop), and it must start a worker again whenever one dies. So before
its loop starts it forks the zygote: a small loop of its own that forks a worker on each
request, reaps them, and tells the supervisor how each ended. Every process has frozen
the garbage collector's view of what was loaded (gc.freeze): a full collection would
otherwise write to every object's header and copy the shared pages one by one.

The zygote dies with the supervisor (parent-death signal, and end of file on its request
pipe); each worker dies with the zygote (cli._die_with_parent): a killed supervisor leaves
no worker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import selectors
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

_set_title: Callable[[str], None] | None
try:
    # Imported here, before the zygote is forked, like everything else a worker runs: a
    # worker importing it itself walked the import machinery anew, about 0.2 MB of
    # private pages (benchmarks/results/2026-12-03-workers-memory.md).
    from setproctitle import setproctitle as _set_title
except ImportError:
    _set_title = None

# Signals the supervisor passes on to the workers itself: the zygote ignores them (a ^C to
# the process group must not end it), the workers get the handlers back.
_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def set_parent_death_signal(signum: int) -> None:
    """Linux: the kernel sends `signum` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signum)


class ForkedWorker:
    """A worker the zygote forked: what the supervisor knows of a child process, without the child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None  # as asyncio's: the exit code, or -signal
        self._exited = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return int(await asyncio.shield(self._exited))

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def exited(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)


class Zygote:
    """The supervisor's side: ask for a worker, learn when one ends."""

    def __init__(self, pid: int, requests: int, replies: int) -> None:
        self.pid = pid
        self._requests = requests
        self._replies = replies
        self._buffer = b""
        self._starting: list[asyncio.Future[ForkedWorker]] = []
        self._workers: dict[int, ForkedWorker] = {}
        self._attached = False
        self.gone = False

    @classmethod
    def fork(cls, main: Callable[[list[str]], int]) -> Zygote:
        """Fork the zygote from this process (no event loop may run yet); workers run `main(argv)`."""
        gc.freeze()  # the supervisor's own collections must not copy the pages it shares
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(requests_w)
                os.close(replies_r)
                code = _serve(requests_r, replies_w, supervisor, main)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(requests_r)
        os.close(replies_w)
        os.set_inheritable(requests_w, False)
        os.set_inheritable(replies_r, False)
        return cls(pid, requests_w, replies_r)

    def _attach(self) -> None:
        if not self._attached:
            asyncio.get_running_loop().add_reader(self._replies, self._read)
            self._attached = True

    async def start(self, argv: Sequence[str]) -> ForkedWorker:
        """A new worker running `pgfleet-pooler` with `argv`; OSError if the zygote is gone."""
        self._attach()
        if self.gone:
            raise OSError("the process that forks the workers has exited")
        waiter: asyncio.Future[ForkedWorker] = asyncio.get_running_loop().create_future()
        self._starting.append(waiter)
        os.write(self._requests, json.dumps(list(argv)).encode() + b"\n")
        return await waiter

    def _read(self) -> None:
        try:
            data = os.read(self._replies, 65536)
        except BlockingIOError:
            return
        if not data:
            self._lost()
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode().partition(" ")
            if kind == "started":
                worker = self._workers[int(rest)] = ForkedWorker(int(rest))
                if self._starting:
                    waiter = self._starting.pop(0)
                    if not waiter.done():
                        waiter.set_result(worker)
            elif kind == "exited":
                pid, code = map(int, rest.split())
                found = self._workers.pop(pid, None)
                if found is not None:
                    found.exited(code)

    def _lost(self) -> None:
        """The zygote exited: no worker can be started again, and none of its workers is known alive."""
        self.gone = True
        asyncio.get_running_loop().remove_reader(self._replies)
        for waiter in self._starting:
            if not waiter.done():
                waiter.set_exception(OSError("the process that forks the workers has exited"))
        self._starting.clear()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def close(self) -> None:
        """End the zygote (it exits when its request pipe closes)."""
        if self._attached and not self.gone:
            asyncio.get_running_loop().remove_reader(self._replies)
        self._attached = False
        for fd in (self._requests, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the zygote itself ------------------------------------------------------------------------------


def _serve(requests: int, replies: int, supervisor: int, main: Callable[[list[str]], int]) -> int:
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor:
        return 0  # the supervisor died before the kernel was told
    handlers = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd hears it
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    me = os.getpid()
    buffer = b""

    def reply(line: str) -> None:
        os.write(replies, line.encode() + b"\n")

    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                os.read(wake_r, 4096)
                _reap(reply)
                continue
            data = os.read(requests, 65536)
            if not data:
                return 0  # the supervisor is gone, or done
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                argv = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    for fd in (requests, replies, wake_r, wake_w):
                        os.close(fd)
                    os._exit(_run_worker(main, argv, handlers, me))
                reply(f"started {pid}")
        _reap(reply)  # a child that ended while this loop was busy


def _reap(reply: Callable[[str], None]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply(f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def _run_worker(
    main: Callable[[list[str]], int], argv: list[str], handlers: dict[signal.Signals, Any], zygote: int
) -> int:
    """In the forked worker: the zygote's state undone, then the pooler's main (cli.main) with `argv`."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        gc.freeze()  # what the worker shares is never collected (and so never copied)
        # cli._die_with_parent: the parent is the zygote, which dies with the supervisor.
        os.environ["PGFLEET_SUPERVISOR_PID"] = str(zygote)
        if _set_title is not None:
            # `ps` (and the tests) tell the workers apart by their command line.
            _set_title(" ".join([*sys.orig_argv, *argv[-4:]]))  # + --worker, --control-dir
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    return code
