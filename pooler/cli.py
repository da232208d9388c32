"""`pgfleet-pooler`: run the proxy from a config file, or check one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .compiled import BUILD
from .config import ConfigError, PoolerConfig, load_config, read_config_text
from .hba import rules_for
from .logoutput import BatchingStreamHandler, StampCachingFormatter
from .shares import WorkerSlot
from .tls import build_contexts

if TYPE_CHECKING:
    # Imported where a pooler runs (serve), not here: the supervisor of `workers` > 1
    # never handles a client, and importing the client path would cost it several MB.
    from .pooler import Pooler

log = logging.getLogger("pgfleet")

# Extra start-up steps (the HTTP control port) register here, so the core never imports them.
Startup = Callable[["Pooler"], Awaitable[None]]
STARTUP_HOOKS: list[Startup] = []

# The supervisor of `workers` > 1 reads the config for its workers before it forks them
# (zygote.py): (the workers' config path, the file's text, the config a worker makes of
# it). A worker whose file still holds that text takes this config: parsing the text
# again (yaml, pydantic) touched pages shared with the supervisor and so copied them,
# about 0.6 MB of each worker's private memory (benchmarks/results/2026-12-03-workers-memory.md).
_read_for_workers: tuple[str, str, PoolerConfig] | None = None


def _raise_fd_limit(config: PoolerConfig) -> None:
    # Every client and server link is a file descriptor; the soft default (1024) would
    # cap a pooler far below max_client_conn.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard, exc)
    log.info("file descriptor limit: %d", soft)
    if config.max_client_conn >= soft:
        # Past the limit, accept() fails and every new client with it, whatever its rights.
        log.warning("max_client_conn (%d) is not below the file descriptor limit (%d)", config.max_client_conn, soft)


async def serve(config: PoolerConfig, config_path: str | None, slot: WorkerSlot | None = None) -> int:
    from .pooler import Pooler

    pooler = Pooler(config, config_path, slot)
    limits_file = pooler.slot.limits_file
    if limits_file is not None and limits_file.exists():
        # A worker started again: the limits in force, not the file's, before the first client.
        pooler.set_limits(json.loads(limits_file.read_text()))
    if _starts_paused(config, pooler.slot):
        # Before the listeners open: not one client is served until RESUME (PUT /pause).
        if pooler.admin is None:
            log.warning("start_paused is set, but this pooler has no admin console to pause with")
        else:
            log.info('starting PAUSEd: new transactions wait until PUT /pause {"paused": false}')
            pooler.admin.start_paused()
    await pooler.start()
    for hook in STARTUP_HOOKS:
        await hook(pooler)
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            pooler.reload()
            log.info("configuration reloaded")
        except ConfigError:
            pass  # already logged; the running configuration stays

    def pause() -> None:
        # PgBouncer's kill -USR1: PAUSE (transactions in flight finish, new ones queue).
        console = pooler.admin
        if console is not None and not console.paused_all:
            log.info("SIGUSR1: pausing")
            console.pause_all()

    def resume() -> None:
        # PgBouncer's kill -USR2: RESUME.
        console = pooler.admin
        if console is not None and not pooler.draining:
            log.info("SIGUSR2: resuming")
            console.resume_all()

    # Handlers are set whatever the disposition inherited: a non-interactive shell starts
    # background jobs with SIGINT and SIGQUIT ignored, and they must still work.
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, pooler.drain)
    loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(pooler.stop()))
    loop.add_signal_handler(signal.SIGQUIT, lambda: loop.create_task(pooler.stop()))  # PgBouncer's immediate exit
    loop.add_signal_handler(signal.SIGUSR1, pause)
    loop.add_signal_handler(signal.SIGUSR2, resume)
    if pooler.slot.single:
        print(f"pgfleet-pooler ready on {config.listen_addr}:{pooler.port} ({BUILD})", file=sys.stderr, flush=True)
    await pooler.wait_stopped()
    log.info("stopped")
    return 0


def _config(path: str, text: str, slot: WorkerSlot | None) -> PoolerConfig:
    """The config `text` of the file at `path` makes; for a worker, the supervisor's reading of it."""
    if slot is None:
        return load_config(path, text=text)
    known = _read_for_workers
    if known is not None and known[:2] == (path, text) and known[2].workers == slot.count:
        return known[2]
    # A worker (re)started by the supervisor runs as one of the workers already running.
    return load_config(path, workers=slot.count, text=text)


def _self_contained(path: str) -> bool:
    """Whether a config file's text alone makes the config: PgBouncer's INI can %include others."""
    return os.path.splitext(path)[1] != ".ini"


def _starts_paused(config: PoolerConfig, slot: WorkerSlot) -> bool:
    """start_paused; for a worker, its supervisor's pause in force (a pause or resume through the
    control port since the config was read wins over the file's setting)."""
    paused_file = slot.paused_file
    if paused_file is not None and paused_file.exists():
        return paused_file.read_text().strip() == "1"
    return config.start_paused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgfleet-pooler", description="PostgreSQL transaction-pooling proxy")
    parser.add_argument("--version", "-V", action=_VersionAction)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", "-c", metavar="FILE", help="run with this config (YAML, or PgBouncer .ini)")
    group.add_argument("--check-config", metavar="FILE", help="validate a config file and exit")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    # Set by the supervisor on the worker processes it starts (workers > 1).
    parser.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)
    parser.add_argument("--control-dir", help=argparse.SUPPRESS)
    return _run(parser.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    path = args.check_config or args.config
    slot: WorkerSlot | None = None
    if args.worker:
        slot = WorkerSlot.parse(args.worker, args.control_dir)
        _die_with_parent()
    try:
        text = read_config_text(path)
        config = _config(path, text, slot)
        build_contexts(config)  # key, certificate and CA files can be read and fit together
        rules_for(config)  # auth_hba_file can be read and every line understood
    except ConfigError as exc:
        print(f"pgfleet-pooler: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{path}: OK")
        return 0
    level = logging.DEBUG if config.verbose else logging.INFO
    prefix = f"[worker {slot.index + 1}/{slot.count}] " if slot is not None else ""
    # force: a worker forked from the supervisor (zygote.py) inherits its handler, without the prefix.
    # Lines written once per turn of the event loop (logoutput.py): a storm logs two per login.
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(StampCachingFormatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The format names no source line, thread or process: records need not look them up
    # (logging's documented switches). log_connections logs twice per login, on by default.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _raise_fd_limit(config)
    if slot is None and config.workers > 1:
        # What every worker runs, loaded once here: the workers are forked from it
        # (zygote.py) and share these pages instead of each loading its own copy.
        from . import client, pooler  # noqa: F401

        global _read_for_workers
        worker_path = _worker_config_path(args)
        if _self_contained(worker_path):
            with contextlib.suppress(ConfigError):  # then each worker reads it, and says what is wrong
                _read_for_workers = (worker_path, text, load_config(worker_path, workers=config.workers, text=text))
        from .supervisor import supervise
        from .zygote import Zygote

        _load_extensions()
        if not args.no_uvloop:
            with contextlib.suppress(ImportError):
                import uvloop
        main_coro = supervise(config, path, _worker_command(args), Zygote.fork(functools.partial(_worker_main, args)))
    else:
        _load_extensions()  # the workers' (and a single pooler's) HTTP port
        main_coro = serve(config, path, slot)
    try:
        if not args.no_uvloop:
            try:
                import uvloop

                return uvloop.run(main_coro)
            except ImportError:
                pass
        return asyncio.run(main_coro)
    except OSError as exc:
        print(f"pgfleet-pooler: cannot start: {exc}", file=sys.stderr)
        return 1


class _VersionAction(argparse.Action):
    """`--version`: argparse's own, but the version is looked up only when asked for.

    The lookup (importlib.metadata) scans the installation and parses the package's
    metadata; every worker forked from the supervisor made it again on its way through
    main(), about 0.8 MB of private pages each (benchmarks/results/2026-12-03-workers-memory.md).
    """

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="show the version and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("pgfleet")
    except PackageNotFoundError:
        ours = "unknown"
    return f"pgfleet-pooler {ours} ({BUILD}); admin console of PgBouncer 1.25"


def _worker_main(supervisor: argparse.Namespace, argv: list[str]) -> int:
    """main(argv) in a worker the zygote forked (zygote.py).

    `argv` is the supervisor's worker command (_worker_command) and `--worker I/N
    --control-dir DIR` after it (supervisor.Worker): everything but those two the
    supervisor has parsed already (`supervisor`). A parser built again in each worker
    cost about 0.4 MB of its private memory (benchmarks/results/2026-12-03-workers-memory.md).
    """
    command = _worker_command(supervisor)
    tail = argv[len(command) :]
    if argv[: len(command)] != command or len(tail) != 4 or tail[0::2] != ["--worker", "--control-dir"]:
        return main(argv)  # not that layout: argparse makes sense of it
    worker, control_dir = tail[1::2]
    parsed = {
        **vars(supervisor),
        "config": _worker_config_path(supervisor),
        "worker": worker,
        "control_dir": control_dir,
    }
    return _run(argparse.Namespace(**parsed))


def _worker_command(args: argparse.Namespace) -> list[str]:
    """The arguments a worker runs with: this config file, this event loop."""
    argv = ["--config", _worker_config_path(args)]
    return argv + (["--no-uvloop"] if args.no_uvloop else [])


def _worker_config_path(args: argparse.Namespace) -> str:
    return os.path.abspath(str(args.config))


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor (it would hold the port with nobody to stop it).

    Its parent is the zygote that forked it (zygote.py), which dies with the supervisor.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get("PGFLEET_SUPERVISOR_PID", str(os.getppid())):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before prctl took effect


def _load_extensions() -> None:
    """Import optional parts that register themselves (the HTTP port)."""
    import importlib

    for name in ("pgfleet.pooler.http",):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


if __name__ == "__main__":
    sys.exit(main())
