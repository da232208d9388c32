"""`make demo`: a fleet of poolers kept inside what PostgreSQL can give, on one machine.

A throwaway PostgreSQL with max_connections 50 (47 usable), three pgfleet poolers in
front of it, and the standalone budget controller (`pgfleet-operator budget`) keeping
them inside a budget of 40 backends. A crowd of short-lived "serverless" clients
(connect, one or two transactions, disconnect) goes through the poolers. Midway another
application grabs 30 backends and later lets go; the load also shifts to one pooler. A
table shows each period; a summary says what the clients saw and how fast the fleet
followed each change. Everything it starts is stopped at the end.

    .venv/bin/python -m pgfleet.devtools.fleetdemo [--duration 40] [--period 1] [--clients 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fleetlab import (
    FLEET_ROLE,
    OTHER_ROLE,
    TOKEN,
    Crowd,
    CrowdStats,
    Grabber,
    Sample,
    Sampler,
    budget_in_force,
    lab_database,
    start_fleet_pooler,
)
from .procs import ProcessFailed, ToolMissing

MAX_BACKENDS = 40
RESERVE = 5  # kept free for others: the room another application grows into, period by period
GRAB = 30


@dataclass
class Change:
    name: str
    at: float  # monotonic
    done: float | None = None  # seconds until the fleet had followed


@dataclass
class Story:
    periods: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    def budget_at(self, sample: Sample) -> int | None:
        """The budget in force when `sample` counted, by the controller's clock (budget_in_force).

        Each period's JSON says when it began (`at`, the wall clock of its observation),
        which this machine's monotonic clock places among the samples.
        """
        offset = time.time() - time.monotonic()
        starts = [(p["at"] - offset, p["fleets"]["fleet"]["budget"]) for _, p in self.periods]
        return budget_in_force(sorted(starts, key=lambda s: s[0]), sample)


def row(elapsed: float, period: dict[str, Any], fleet_backends: int, others: int, names: list[str]) -> str:
    fleet = period["fleets"]["fleet"]
    cells = []
    for name in names:
        pod = fleet["pods"].get(name) or {}
        cells.append(
            f"{pod.get('clients', 0):>4} {pod.get('waiting', 0):>4} {pod.get('servers', 0):>3} {pod.get('limit') or 0:>3}"
        )
    return (
        f"{elapsed:>5.1f}  "
        + "  |  ".join(cells)
        + f"  || {fleet['budget']:>3} {fleet_backends:>4} {others:>4} {period.get('usable') or 0:>4}"
    )


async def demo(args: argparse.Namespace, workdir: Path) -> int:
    print("starting PostgreSQL (max_connections 50, 3 reserved for superusers) ...", flush=True)
    pg = await asyncio.to_thread(lab_database, 50)
    poolers = []
    controller = None
    sampler = Sampler(pg)
    stats = CrowdStats()
    grabber = Grabber(pg)
    story = Story()
    try:
        for i in range(3):
            poolers.append(await asyncio.to_thread(start_fleet_pooler, pg, workdir, f"pooler{i}"))
        names = [p.url.split("://", 1)[1] for p in poolers]
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        argv = [
            sys.executable, "-m", "pgfleet.operator", "budget", "--dsn", pg.dsn(),
            *(arg for p in poolers for arg in ("--pooler", p.url)), "--token-file", str(token_file),
            "--max-backends", str(MAX_BACKENDS), "--reserve", str(RESERVE), "--period", str(args.period), "--json",
        ]  # fmt: skip
        print(
            f"3 poolers; controller: pgfleet-operator budget --max-backends {MAX_BACKENDS} --reserve {RESERVE} "
            f"--period {args.period}"
        )
        controller = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        await sampler.start()
        crowds = [Crowd(p.port, query="SELECT pg_sleep(0.01)", stats=stats) for p in poolers]
        for i, crowd in enumerate(crowds):
            crowd.add_serverless(args.clients // 3, pause=0.02, seed=i)
        start = time.monotonic()
        header = "  |  ".join(f"{'pooler' + str(i):^18}" for i in range(3))
        print(f"\n{'t(s)':>5}  {header}  || server")
        print(
            f"{'':>5}  "
            + "  |  ".join(f"{'cli':>4} {'wait':>4} {'srv':>3} {'lim':>3}" for _ in range(3))
            + "  || bud fleet othr usbl"
        )

        async def script() -> None:
            await asyncio.sleep(args.duration * 0.25)
            story.changes.append(Change(f"another application grabs {GRAB} backends", time.monotonic()))
            print(f"--- another application opens {GRAB} connections", flush=True)
            # It takes what is free, waiting for more: the fleet gives way period by period.
            await grabber.grab(GRAB, time.monotonic() + args.duration * 0.25)
            await asyncio.sleep(args.duration * 0.05)
            story.changes.append(Change("the load moves to pooler0", time.monotonic()))
            print("--- the load moves to pooler0", flush=True)
            await crowds[1].stop()
            await crowds[2].stop()
            crowds[0].add_serverless(args.clients, pause=0.02, seed=9)
            await asyncio.sleep(args.duration * 0.2)
            story.changes.append(Change("the other application lets go", time.monotonic()))
            print("--- the other application closes its connections", flush=True)
            await grabber.release()

        scripted = asyncio.create_task(script())
        assert controller.stdout is not None
        while time.monotonic() - start < args.duration:
            try:
                line = await asyncio.wait_for(controller.stdout.readline(), timeout=args.period * 5)
            except TimeoutError:
                continue
            if not line:
                raise ProcessFailed("the controller stopped")
            period = json.loads(line)
            now = time.monotonic()
            story.periods.append((now, period))
            last = sampler.samples[-1] if sampler.samples else None
            fleet_backends = last.count(FLEET_ROLE) if last else 0
            others = last.total - fleet_backends if last else 0
            print(row(now - start, period, fleet_backends, others, names), flush=True)
            _follow(story, period, names, len(grabber.conns))
        scripted.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scripted
        for crowd in crowds:
            await crowd.stop()
    finally:
        await grabber.release()
        await sampler.stop()
        if controller is not None and controller.returncode is None:
            controller.terminate()
            await controller.wait()
        for pooler in poolers:
            await asyncio.to_thread(pooler.stop)
        await asyncio.to_thread(pg.cleanup)
    return _summary(story, sampler, stats, args)


def _follow(story: Story, period: dict[str, Any], names: list[str], grabbed: int) -> None:
    """Mark each change done once the controller shows the fleet has followed it."""
    fleet = period["fleets"]["fleet"]
    limits = [fleet["pods"][n]["limit"] or 0 for n in names]
    now = time.monotonic()
    for change in story.changes:
        if change.done is not None:
            continue
        if "grabs" in change.name:
            # The other application holds all it asked for, and the fleet is inside its budget.
            followed = grabbed >= GRAB and fleet["held"] <= fleet["budget"]
        elif "moves" in change.name:
            followed = limits[0] > max(limits[1:])
        else:
            followed = fleet["budget"] == MAX_BACKENDS - RESERVE and sum(limits) == MAX_BACKENDS - RESERVE
        if followed:
            change.done = now - change.at


def _summary(story: Story, sampler: Sampler, stats: CrowdStats, args: argparse.Namespace) -> int:
    worst = (0, 0)
    over = 0
    first = story.periods[0][1]["at"] - (time.time() - time.monotonic()) if story.periods else 0.0
    for sample in sampler.since(first):
        budget = story.budget_at(sample)
        if budget is None:
            continue
        held = sample.count(FLEET_ROLE)
        over += held > budget
        if budget and (not worst[1] or held / budget > worst[0] / worst[1]):
            worst = (held, budget)
    most_others = max((s.count(OTHER_ROLE) for s in sampler.samples), default=0)
    too_many = stats.errors.get("53300", 0)
    print("\nsummary")
    print(f"  samples of pg_stat_activity (every 100 ms)   {len(sampler.samples)}")
    print(f"  most fleet backends against the budget then  {worst[0]} / {worst[1]} ({over} samples over)")
    print(f"  most backends the other application held      {most_others}")
    print(f"  client connections / transactions             {stats.connects} / {stats.transactions}")
    print(f"  53300 (too many connections) seen by clients  {too_many}")
    print(f"  failed transactions                           {stats.failed} {dict(stats.errors) or ''}")
    for change in story.changes:
        done = f"{change.done:.1f} s" if change.done is not None else "not within the run"
        print(f"  followed '{change.name}' in {done} (period {args.period} s)")
    return 0 if not too_many and not stats.failed and not over else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds the story lasts (default 40)")
    parser.add_argument("--period", type=float, default=1.0, help="the controller's period (default 1 s)")
    parser.add_argument("--clients", type=int, default=60, help="serverless clients at once (default 60)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pgfleet-fleetdemo-"))
    try:
        return asyncio.run(demo(args, workdir))
    except (ToolMissing, ProcessFailed, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
