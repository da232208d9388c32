"""`pgfleet-pooler`: run the proxy from a config file, or check one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable

from .config import ConfigError, PoolerConfig, load_config
from .pooler import Pooler

log = logging.getLogger("pgfleet")

# Extra start-up steps (the HTTP control port) register here, so the core never imports them.
Startup = Callable[[Pooler], Awaitable[None]]
STARTUP_HOOKS: list[Startup] = []


def _raise_fd_limit() -> None:
    # Every client and server link is a file descriptor; the soft default (1024) would
    # cap a pooler far below max_client_conn.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: PoolerConfig, config_path: str | None) -> int:
    pooler = Pooler(config, config_path)
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

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, pooler.drain)
    loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(pooler.stop()))
    print(f"pgfleet-pooler ready on {config.listen_addr}:{pooler.port}", file=sys.stderr, flush=True)
    await pooler.wait_stopped()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgfleet-pooler", description="PostgreSQL transaction-pooling proxy")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", "-c", metavar="FILE", help="run with this config (YAML, or PgBouncer .ini)")
    group.add_argument("--check-config", metavar="FILE", help="validate a config file and exit")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    args = parser.parse_args(argv)

    path = args.check_config or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"pgfleet-pooler: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{path}: OK")
        return 0

    level = logging.DEBUG if config.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_fd_limit()
    _load_extensions()
    try:
        if not args.no_uvloop:
            try:
                import uvloop

                return uvloop.run(serve(config, path))
            except ImportError:
                pass
        return asyncio.run(serve(config, path))
    except OSError as exc:
        print(f"pgfleet-pooler: cannot start: {exc}", file=sys.stderr)
        return 1


def _load_extensions() -> None:
    """Import optional parts that register themselves (admin console, HTTP port)."""
    import importlib

    for name in ("pgfleet.pooler.admin", "pgfleet.pooler.http"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


if __name__ == "__main__":
    sys.exit(main())
