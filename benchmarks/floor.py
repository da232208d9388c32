"""The floor for a Python proxy on this machine: a uvloop forwarder that does nothing else.

Each client gets its own server connection and bytes are copied both ways unparsed: no
framing, no pooling, no statistics. Whatever CPU per transaction it spends is what any
asyncio/uvloop proxy pays before doing a pooler's work.

It runs in its own process beside one compiled pgfleet process and PgBouncer, the three
taking turns in each round against one PostgreSQL, and each one's CPU per transaction is
read from /proc split into user and system time, so that pgfleet's gap to PgBouncer can be
told apart into what uvloop and CPython cost any proxy (the floor) and what pgfleet's own
work costs on top of it. The floor's user time is the comparable part: its system time is
not, as it holds one backend per client (PostgreSQL then runs more processes than behind
a pool of 20, and the machine schedules differently).

    make compiled && .venv/bin/python -P benchmarks/floor.py [--clients 50,200] [--modes simple,extended]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgfleet.devtools.pgbench import PgbenchArgs, pgbench_init, run_pgbench
from pgfleet.devtools.procs import (
    CLK_TCK,
    PoolerProcess,
    descendants,
    free_port,
    pgbouncer_path,
    spawn,
    start_pgbouncer,
    start_pgfleet,
    stat_fields,
    transaction_pool_config,
)
from pgfleet.devtools.tempdb import TempPostgres

ROOT = Path(__file__).resolve().parent.parent
DB = "postgres"


# -- the forwarder (runs as `floor.py --serve DB_PORT LISTEN_PORT`) ----------------------------


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


async def _serve(db_port: int, port: int) -> None:
    await asyncio.get_running_loop().create_server(lambda: _ClientSide(db_port), "127.0.0.1", port)
    await asyncio.Event().wait()


# -- the measurement -------------------------------------------------------------------------


@dataclass
class Sample:
    tps: float
    user_us: float  # per transaction
    system_us: float


@dataclass
class Row:
    samples: list[Sample] = field(default_factory=list)

    def mean(self, attr: str) -> float:
        return statistics.fmean(getattr(s, attr) for s in self.samples)

    @property
    def total(self) -> float:
        return self.mean("user_us") + self.mean("system_us")


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` and its living descendants."""
    user = system = 0
    for p in descendants(pid):
        fields = stat_fields(p)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def start_floor(db_port: int, workdir: Path, wrapper: Sequence[str] = (), ready_timeout: float = 30.0) -> PoolerProcess:
    """The forwarder in front of PostgreSQL on db_port; `wrapper` runs it (instructions.py: valgrind)."""
    port = free_port()
    argv = [sys.executable, "-P", str(Path(__file__).resolve()), "--serve", str(db_port), str(port)]
    return spawn("floor", argv, "127.0.0.1", port, workdir, {}, wrapper=wrapper, ready_timeout=ready_timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="50,200", help="client counts, comma-separated")
    parser.add_argument("--modes", default="simple,extended", help="pgbench query modes, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the targets taking turns in each")
    parser.add_argument("--pool-size", type=int, default=20, help="the poolers' default_pool_size")
    parser.add_argument("--compiled", type=Path, default=ROOT / "build" / "compiled", help="pgfleet's compiled build")
    parser.add_argument("--serve", nargs=2, type=int, metavar=("DB_PORT", "PORT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        import uvloop

        uvloop.run(_serve(*opts.serve))
        return 0
    clients = [int(c) for c in opts.clients.split(",")]
    modes = [m.strip() for m in opts.modes.split(",")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if (opts.compiled / "pgfleet").is_dir():
        env["PYTHONPATH"] = str(opts.compiled)
    else:
        print(f"no compiled build in {opts.compiled} (`make compiled`): pgfleet runs from the sources", file=sys.stderr)
    # The forwarder opens one backend per client; the poolers a pool each.
    with (
        tempfile.TemporaryDirectory(prefix="pgfleet-floor-") as root,
        TempPostgres(max_connections=max(clients) + 2 * opts.pool_size + 20) as pg,
    ):
        Path(root).chmod(0o755)  # PgBouncer runs as `postgres` when we are root
        pgbench_init(pg.host, pg.port, DB, scale=5)
        targets: dict[str, PoolerProcess] = {}
        try:
            for name in ("floor", "pgfleet", "pgbouncer"):
                workdir = Path(root) / name
                workdir.mkdir(mode=0o755)
                config = transaction_pool_config(
                    pg.host, pg.port, DB, listen_port=free_port(), pool_size=opts.pool_size, max_clients=1000
                )
                if name == "floor":
                    targets[name] = start_floor(pg.port, workdir)
                elif name == "pgfleet":
                    targets[name] = start_pgfleet({**config, "workers": 1}, workdir, env=env)
                elif pgbouncer_path() is not None:
                    targets[name] = start_pgbouncer(config, workdir)
            for proc in targets.values():  # fill the pools, warm the caches
                run_pgbench(proc.host, proc.port, DB, PgbenchArgs(clients=max(clients), duration=1))
            rows: dict[tuple[str, int, str], Row] = {}
            for round_ in range(opts.rounds):
                names = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for mode in modes:
                    for count in clients:
                        for name in names:
                            proc = targets[name]
                            user0, system0 = user_system_seconds(proc.pid)
                            result = run_pgbench(
                                proc.host,
                                proc.port,
                                DB,
                                PgbenchArgs(clients=count, jobs=2, duration=opts.duration, mode=mode),
                            )
                            user1, system1 = user_system_seconds(proc.pid)
                            if not result.ok or not result.transactions:
                                print(f"{name} {mode} {count}: pgbench failed: {result.error}", file=sys.stderr)
                                continue
                            n = result.transactions
                            sample = Sample(result.tps or 0.0, (user1 - user0) * 1e6 / n, (system1 - system0) * 1e6 / n)
                            rows.setdefault((mode, count, name), Row()).samples.append(sample)
                            print(
                                f"  {mode} {count} {name}: {sample.tps:,.0f} tps, "
                                f"{sample.user_us:.1f} + {sample.system_us:.1f} µs/txn",
                                flush=True,
                            )
        finally:
            for proc in targets.values():
                proc.stop()
    print(render(rows, modes, clients, opts))
    return 0


def render(
    rows: dict[tuple[str, int, str], Row], modes: list[str], clients: list[int], opts: argparse.Namespace
) -> str:
    lines = [
        f"pgbench -S, {opts.rounds} rounds of {opts.duration:g} s, targets taking turns; CPU µs per transaction "
        "of each target's process (user + system), mean of the rounds.",
        "",
        "| case | target | tps | user | system | total | total ÷ PgBouncer | user over the floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        for count in clients:
            bouncer = rows.get((mode, count, "pgbouncer"))
            floor = rows.get((mode, count, "floor"))
            for name in ("floor", "pgfleet", "pgbouncer"):
                row = rows.get((mode, count, name))
                if row is None or not row.samples:
                    continue
                ratio = f"{row.total / bouncer.total:.2f}" if bouncer and bouncer.samples else "—"
                over = f"{row.mean('user_us') - floor.mean('user_us'):+.1f}" if floor and floor.samples else "—"
                lines.append(
                    f"| {mode}, {count} | {name} | {row.mean('tps'):,.0f} | {row.mean('user_us'):.1f} | "
                    f"{row.mean('system_us'):.1f} | {row.total:.1f} | {ratio} | {over} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
