"""What pgfleet's memory goes to: idle clients, and the processes of `workers: N` before any client.

    make compiled && .venv/bin/python benchmarks/memory.py [--counts 1000,10000] [--rounds 2] [--out FILE]
        [--also LABEL=DIR ...]

`--also` adds pgfleet targets installed elsewhere (`pip install --target DIR`, compiled or
not), e.g. the commit before a change, measured in the same rounds as the others.

Three parts, in one run against one throwaway PostgreSQL:

1. **KiB per idle client**: each pooler started afresh (pgfleet as one process from the
   compiled build and from the sources, PgBouncer when installed), 10 clients logged in
   and out, then `count` idle clients held by `pgfleet.devtools.idleclients` (startup,
   trust, ReadyForQuery, then nothing); the growth of the pooler's VmRSS divided by the
   clients. Targets take turns in each round.
2. **Breakdown**: one pooler run inside a child process with tracemalloc on, the same
   idle clients connected from outside; the allocations they added, by the source line
   that made them, and the Python objects they added, by type (GC-tracked objects only:
   str, bytes and ints are in the tracemalloc lines). Once per build.
3. **Processes of `workers: N`**: pgfleet with N workers (compiled) started, no client;
   RSS, PSS and USS (Private_Clean + Private_Dirty) of the supervisor and each worker
   from /proc/PID/smaps_rollup. PSS counts a page shared by k processes as 1/k in each,
   so its sum is what the processes take from the machine together.

Everything started is stopped at the end, also on error or ^C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgfleet.devtools.idleclients import IdleClients
from pgfleet.devtools.procs import (
    PoolerProcess,
    descendants,
    free_port,
    pgbouncer_path,
    raise_nofile,
    rss_kib,
    start_pgbouncer,
    start_pgfleet,
    transaction_pool_config,
)
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.compiled import COMPILED_LABEL, SOURCES_LABEL

ROOT = Path(__file__).resolve().parent.parent
DB = "bench"
COMPILED, PURE, PGBOUNCER = "pgfleet compiled", "pgfleet pure Python", "pgbouncer"


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and Uss (private pages) in KiB of one process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def env_for(compiled: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if compiled is not None:
        env["PYTHONPATH"] = str(compiled)
    return env


def wait_for_line(proc: PoolerProcess, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not print {text!r} within {timeout:g}s:\n{proc.log_tail()}")


def starter(
    kind: str, pg: TempPostgres, workroot: Path, max_clients: int, compiled: Path, also: dict[str, Path]
) -> Callable[[], PoolerProcess]:
    counter = iter(range(1_000_000))

    def start() -> PoolerProcess:
        workdir = workroot / f"{kind.replace(' ', '-')}-{next(counter)}"
        workdir.mkdir(mode=0o755)
        config = transaction_pool_config(
            pg.host, pg.port, DB, listen_port=free_port(), pool_size=20, max_clients=max_clients
        )
        if kind == PGBOUNCER:
            return start_pgbouncer(config, workdir)
        path = also.get(kind) or (compiled if kind == COMPILED else None)
        proc = start_pgfleet({**config, "workers": 1}, workdir, env=env_for(path))
        build = COMPILED_LABEL if kind == COMPILED else SOURCES_LABEL
        ready = wait_for_line(proc, "pgfleet-pooler ready on")
        if kind not in also and build not in ready:
            proc.stop()
            raise RuntimeError(f"{kind} was to run the {build} build, but says: {ready}")
        return proc

    return start


def per_client_kib(start: Callable[[], PoolerProcess], count: int) -> tuple[float, int, int]:
    """(KiB per idle client, RSS before, clients connected) of a fresh pooler."""
    with start() as proc:
        with IdleClients(proc.host, proc.port, 10, dbname=DB) as warm:
            warm.wait_ready(60)
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        with IdleClients(proc.host, proc.port, count, dbname=DB) as idle:
            ready = idle.wait_ready(600)
            time.sleep(1.0)
            after = rss_kib(proc.pid)
        if ready.failed:
            raise RuntimeError(f"{ready.failed} of {count} idle clients failed: {ready.first_error}")
        return (after - before) / ready.connected, before, ready.connected


# -- the breakdown, inside a child process that runs the pooler ---------------------------------


async def _breakdown(pg_port: int, count: int, top: int) -> dict[str, Any]:
    import tracemalloc

    from pgfleet.pooler.compiled import BUILD
    from pgfleet.pooler.config import parse_config
    from pgfleet.pooler.pooler import Pooler

    loop = asyncio.get_running_loop()
    config = parse_config(
        transaction_pool_config(
            "127.0.0.1", pg_port, DB, listen_port=free_port(), pool_size=20, max_clients=count + 100
        )
    )
    pooler = Pooler(config)
    await pooler.start()
    try:
        with IdleClients("127.0.0.1", pooler.port, 10, dbname=DB) as warm:
            await loop.run_in_executor(None, warm.wait_ready, 60)
        await wait_until(lambda: not pooler.clients, timeout=30)
        gc.collect()
        types_before = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        tracemalloc.start(1)
        first = tracemalloc.take_snapshot()
        rss_before = rss_kib(os.getpid(), tree=False)
        with IdleClients("127.0.0.1", pooler.port, count, dbname=DB) as idle:
            ready = await loop.run_in_executor(None, idle.wait_ready, 600)
            await wait_until(lambda: pooler.logged_in_clients >= ready.connected, timeout=60)
            await asyncio.sleep(0.5)
            gc.collect()
            second = tracemalloc.take_snapshot()
            traced = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            rss_after = rss_kib(os.getpid(), tree=False)
            objects = gc.get_objects()
            types_after = collections.Counter(type(o).__qualname__ for o in objects)
            sizes: dict[str, int] = collections.defaultdict(int)
            for o in objects:
                sizes[type(o).__qualname__] += sys.getsizeof(o)
            client = next(iter(pooler.clients))
            attributes = {}
            for name in sorted(getattr(type(client), "__slots__", ())):
                value = getattr(client, name, None)
                if isinstance(value, dict | list | set | tuple | bytes | str | bytearray) or value is None:
                    attributes[name] = f"{type(value).__name__} {sys.getsizeof(value)}" if value is not None else "None"
            transport = client.transport
            one = {
                "client object": sys.getsizeof(client),
                "transport": sys.getsizeof(transport),
                "transport type": f"{type(transport).__module__}.{type(transport).__qualname__}",
                "attributes": attributes,
            }
        stats = second.compare_to(first, "lineno")
        lines = [
            (str(s.traceback[0]) if s.traceback else "?", s.size_diff, s.count_diff)
            for s in stats[:top]
            if s.size_diff > 0
        ]
        new_types = [
            (name, types_after[name] - types_before.get(name, 0), sizes[name])
            for name in types_after
            if types_after[name] - types_before.get(name, 0) >= count // 2
        ]
        new_types.sort(key=lambda item: -item[2])
        growth = sum(s.size_diff for s in stats)
        # The event loop's own allocations (uvloop's transports and libuv handles, and what
        # compiled code allocates) carry the line that runs the loop: their sizes tell them apart.
        first_lines = {(t.traceback[0].filename, t.traceback[0].lineno) for t in first.traces}
        runner = stats[0].traceback[0] if stats and stats[0].traceback else None
        block_sizes: collections.Counter[int] = collections.Counter()
        if runner is not None:
            for trace in second.traces:
                frame = trace.traceback[0]
                if (frame.filename, frame.lineno) == (runner.filename, runner.lineno):
                    block_sizes[trace.size] += 1
        del first_lines
        return {
            "build": BUILD,
            "connected": ready.connected,
            "rss_per_client": (rss_after - rss_before) * 1024 / max(ready.connected, 1),
            "traced_per_client": growth / max(ready.connected, 1),
            "traced_total": traced,
            "lines": lines,
            "types": new_types,
            "one": one,
            "runner": str(runner),
            "runner_blocks": [(size, n) for size, n in block_sizes.most_common(12)],
        }
    finally:
        await pooler.stop()


def breakdown_child(pg_port: int, count: int, top: int) -> None:
    raise_nofile(count + 256)
    try:
        import uvloop

        result = uvloop.run(_breakdown(pg_port, count, top))
    except ImportError:
        result = asyncio.run(_breakdown(pg_port, count, top))
    print("BREAKDOWN " + json.dumps(result), flush=True)


def breakdown(pg: TempPostgres, count: int, compiled: Path | None, top: int = 25) -> dict[str, Any]:
    argv = [sys.executable, "-P", __file__, "--breakdown-child", str(pg.port), str(count), str(top)]
    out = subprocess.run(argv, env=env_for(compiled), capture_output=True, text=True, timeout=900, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BREAKDOWN "):
            result: dict[str, Any] = json.loads(line.removeprefix("BREAKDOWN "))
            return result
    raise RuntimeError(f"breakdown failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def breakdown_report(result: dict[str, Any], count: int) -> list[str]:
    n = result["connected"]
    lines = [
        f"### {result['build']}, {n:,} idle clients",
        "",
        f"RSS of the process grew {result['rss_per_client'] / 1024:.2f} KiB per client; tracemalloc "
        f"saw {result['traced_per_client']:.0f} bytes per client allocated by Python's allocators "
        "(the rest is the C library's: libuv handles, pymalloc arenas not yet full, fragmentation).",
        "",
        "| allocated at | bytes per client | blocks per client |",
        "|---|---|---|",
    ]
    for where, size, blocks in result["lines"]:
        if size / n >= 4:
            lines.append(f"| `{where}` | {size / n:.0f} | {blocks / n:.2f} |")
    lines += ["", "| new objects (GC-tracked), by type | per client | bytes each (getsizeof) |", "|---|---|---|"]
    for name, added, size in result["types"]:
        lines.append(f"| `{name}` | {added / n:.2f} | {size / max(added, 1):.0f} |")
    if result.get("runner_blocks"):
        blocks = ", ".join(f"{size} B x {count / n:.2f}" for size, count in result["runner_blocks"] if count >= n // 4)
        lines += ["", f"Blocks allocated at `{result['runner']}` (per client): {blocks}."]
    one = result["one"]
    attrs = ", ".join(f"{k}: {v}" for k, v in one["attributes"].items())
    lines += [
        "",
        f"One idle client: the protocol object {one['client object']} bytes, its transport "
        f"(`{one['transport type']}`) {one['transport']} bytes; attributes: {attrs}.",
    ]
    return lines


# -- the processes of workers: N --------------------------------------------------------------


def workers_memory(
    pg: TempPostgres, workroot: Path, workers: int, compiled: Path | None
) -> list[tuple[str, dict[str, int]]]:
    workdir = workroot / f"workers-{workers}-{time.monotonic_ns()}"
    workdir.mkdir(mode=0o755)
    config = transaction_pool_config(pg.host, pg.port, DB, listen_port=free_port(), pool_size=20, max_clients=1000)
    with start_pgfleet({**config, "workers": workers}, workdir, env=env_for(compiled)) as proc:
        wait_for_line(proc, "pgfleet-pooler ready on")
        time.sleep(1.0)
        rows = [("supervisor" if workers > 1 else "the pooler (one process)", smaps(proc.pid))]
        for pid in sorted(p for p in descendants(proc.pid) if p != proc.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
            name = f"worker {argv[argv.index('--worker') + 1]}" if "--worker" in argv else "zygote (forks the workers)"
            rows.append((name, smaps(pid)))
    return rows


def workers_report(rows: list[tuple[str, dict[str, int]]]) -> list[str]:
    lines = ["| process | RSS KiB | PSS KiB | USS KiB |", "|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['rss']:,} | {m['pss']:,} | {m['uss']:,} |")
    total = {k: sum(m[k] for _, m in rows) for k in ("rss", "pss", "uss")}
    lines.append(f"| **sum** | {total['rss']:,} | {total['pss']:,} | {total['uss']:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--counts", default="1000,10000", help="idle clients per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--breakdown", type=int, default=10_000, help="idle clients of the breakdown; 0 skips it")
    parser.add_argument("--workers", default="2", help="workers of the process measurements (1,2); 0 skips them")
    parser.add_argument("--compiled", type=Path, default=ROOT / "build" / "compiled")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=DIR", help="another pgfleet build")
    parser.add_argument("--breakdown-child", nargs=3, type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.breakdown_child:
        breakdown_child(*opts.breakdown_child)
        return 0
    counts = [int(c) for c in opts.counts.split(",") if c.strip()]
    compiled = opts.compiled if any((opts.compiled / "pgfleet" / "pooler").glob("client.*.so")) else None
    if compiled is None:
        print(f"no compiled build in {opts.compiled}: run `make compiled`", file=sys.stderr)
        return 2
    max_clients = max([*counts, opts.breakdown]) + 1000
    raise_nofile(max_clients + 1000)
    started = time.monotonic()
    workroot = Path(tempfile.mkdtemp(prefix="pgfleet-memory-"))
    workroot.chmod(0o755)
    also = {label: Path(path) for label, _, path in (item.partition("=") for item in opts.also)}
    kinds = [COMPILED, PURE, *also] + ([PGBOUNCER] if pgbouncer_path() else [])
    per: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    base: dict[str, list[int]] = collections.defaultdict(list)
    report: list[str] = []
    pg = TempPostgres(max_connections=100).start()
    try:
        pg.sql(f"CREATE DATABASE {DB}")
        starters = {kind: starter(kind, pg, workroot, max_clients, compiled, also) for kind in kinds}
        for round_ in range(opts.rounds):
            for count in counts:
                order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
                for kind in order:
                    kib, before, _ = per_client_kib(starters[kind], count)
                    per[(kind, count)].append(kib)
                    base[kind].append(before)
                    print(f"round {round_ + 1}: {kind}, {count:,} idle clients: {kib:.2f} KiB each", flush=True)
        breakdowns = []
        if opts.breakdown:
            for build in (compiled, None):
                breakdowns.append(breakdown(pg, opts.breakdown, build))
                print(f"breakdown: {breakdowns[-1]['build']} done", flush=True)
        processes = {
            n: workers_memory(pg, workroot, n, compiled) for n in (int(w) for w in opts.workers.split(",")) if n
        }
    finally:
        pg.cleanup()
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(workroot)], check=False)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    report += [
        "# pgfleet memory: idle clients and worker processes",
        "",
        f"- machine: {os.cpu_count()} CPUs, Linux {platform.release()}, python {platform.python_version()}",
        f"- pgfleet commit: {commit.stdout.strip() or '?'}; run took {(time.monotonic() - started) / 60:.1f} min",
        f"- {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; `benchmarks/memory.py --counts {opts.counts} "
        f"--rounds {opts.rounds} --breakdown {opts.breakdown} --workers {opts.workers}`",
        "",
        "## KiB per idle client",
        "",
        "VmRSS growth of a fresh pooler (after 10 clients logged in and out) with the idle clients connected, "
        "divided by them; mean (min-max) over the rounds.",
        "",
        "| target | RSS before KiB | " + " | ".join(f"{c:,} clients" for c in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    for kind in kinds:
        cells = []
        for count in counts:
            values = per[(kind, count)] or [float("nan")]
            cells.append(f"{sum(values) / len(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        report.append(f"| {kind} | {min(base[kind] or [0]):,} | " + " | ".join(cells) + " |")
    if breakdowns:
        report += ["", "## Breakdown", ""]
        for result in breakdowns:
            report += [*breakdown_report(result, opts.breakdown), ""]
    for workers, rows in processes.items():
        report += ["", f"## `workers: {workers}` before any client (compiled build)", "", *workers_report(rows)]
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if opts.out:
        opts.out.write_text(text)
        print(f"written to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
