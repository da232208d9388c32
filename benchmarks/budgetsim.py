"""Simulation of the budget allocator on a large fleet: fake clock, no sockets.

Many PostgreSQL servers, many PgPools on each, up to 100 pods per PgPool. Every period,
others' load on each server walks and jumps, pods restart (back at the floor), become
unreachable for a while, PgPools scale up and down, and demand moves between pods. The
allocator (pgfleet.operator.allocate, the code the budget loop runs) computes every
server's budgets; pods take their new limits (an unreachable one keeps its last), and the
invariants are checked at every step:

- the budgets of a server sum to at most usable - others (unless pods that cannot be
  reached still hold more, which is counted apart);
- a fleet's pods' limits plus its surge room never exceed its budget;
- every limit is 0 or at least the pod's worker count;
- with the server unobserved, no limit rises.

It reports the CPU time one period's allocation takes for the whole simulated fleet
(CPU time: the allocator does no I/O, and the machine may be shared).

    .venv/bin/python benchmarks/budgetsim.py                         # 200 servers x 50 PgPools
    .venv/bin/python benchmarks/budgetsim.py --servers 20 --periods 50 --out benchmarks/results/NAME.md
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

from pgfleet.operator.allocate import FleetSpec, PodState, ServerFacts, allocate_server


@dataclass
class SimPod:
    name: str
    limit: int | None = None  # in force; None: just started (at the floor)
    reachable: bool = True
    down_for: int = 0
    demand: int = 0


@dataclass
class SimFleet:
    name: str
    spec: FleetSpec
    pods: list[SimPod] = field(default_factory=list)
    budget: int | None = None
    serial: int = 0

    def add_pod(self) -> None:
        self.serial += 1
        self.pods.append(SimPod(f"{self.name}-{self.serial}"))


@dataclass
class SimServer:
    max_connections: int
    reserved: int
    others: int
    fleets: list[SimFleet]
    unobserved_for: int = 0


@dataclass
class Tally:
    periods: int = 0
    checks: int = 0
    pinned_over: int = 0  # periods where unreachable pods held more than a server's headroom
    violations: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    pods: list[int] = field(default_factory=list)
    worst_server: float = 0.0


def build(rng: random.Random, servers: int, pgpools: int, max_pods: int) -> list[SimServer]:
    out = []
    for s in range(servers):
        max_connections = rng.choice([100, 200, 500, 1000, 2000, 5000])
        fleets = []
        for f in range(pgpools):
            workers = rng.choice([1, 1, 1, 2, 4])
            # Log-uniform pod counts: most PgPools are small, a few have up to max_pods.
            count = max(1, int(max_pods ** rng.random()))
            spec = FleetSpec(
                name=f"s{s}-p{f}",
                role=f"role{f % 7}",
                database=f"db{f % 5}",
                max_backends=rng.choice([None, rng.randint(count * workers, count * workers * 20)]),
                max_backends_percent=rng.choice([None, rng.randint(5, 100)]),
                reserve=rng.randint(0, 5),
                weight=rng.choice([1, 1, 2, 5]),
                workers=workers,
                surge=rng.choice([0, 1, 2]),
            )
            fleet = SimFleet(spec.name, spec)
            for _ in range(count):
                fleet.add_pod()
            fleets.append(fleet)
        out.append(SimServer(max_connections, rng.choice([0, 0, 3]), rng.randint(0, max_connections // 4), fleets))
    return out


def churn(rng: random.Random, server: SimServer, max_pods: int) -> None:
    # Others: a walk, and now and then a jump (a batch job, a migration, a leak).
    server.others = max(0, server.others + rng.randint(-5, 5))
    if rng.random() < 0.05:
        server.others = rng.randint(0, server.max_connections)
    server.unobserved_for = max(0, server.unobserved_for - 1)
    if rng.random() < 0.01:
        server.unobserved_for = rng.randint(1, 3)
    for fleet in server.fleets:
        r = rng.random()
        if r < 0.02 and len(fleet.pods) < max_pods:
            fleet.add_pod()  # scale up: a new pod at the floor
        elif r < 0.04 and len(fleet.pods) > 1:
            fleet.pods.pop(rng.randrange(len(fleet.pods)))  # scale down
        hot = rng.randrange(len(fleet.pods)) if rng.random() < 0.2 else None
        for i, pod in enumerate(fleet.pods):
            if pod.down_for:
                pod.down_for -= 1
                pod.reachable = pod.down_for == 0
            elif rng.random() < 0.005:
                pod.reachable, pod.down_for = False, rng.randint(1, 4)
            if rng.random() < 0.003:
                pod.limit = None  # restarted: the ConfigMap's floor
            pod.demand = rng.randint(0, 60) if i == hot else max(0, pod.demand + rng.randint(-3, 3))


def step(server: SimServer, tally: Tally) -> None:
    observed = server.unobserved_for == 0
    facts = ServerFacts(max_connections=server.max_connections, reserved=server.reserved, others=server.others)
    specs = []
    for fleet in server.fleets:
        floor = max(1, fleet.spec.workers)
        pods = tuple(
            PodState(
                p.name,
                limit=p.limit if p.limit is not None else floor,
                reachable=p.reachable,
                held=min(p.demand, p.limit if p.limit is not None else floor),
                active=min(p.demand, p.limit if p.limit is not None else floor),
                waiting=max(0, p.demand - (p.limit if p.limit is not None else floor)),
            )
            for p in fleet.pods
        )
        specs.append(replace(fleet.spec, pods=pods, budget=fleet.budget))
    # CPU time, not wall time: the machine may be shared, and the allocator does no I/O.
    started = time.process_time()
    result = allocate_server(facts if observed else None, specs)
    took = time.process_time() - started
    tally.worst_server = max(tally.worst_server, took)
    tally.times[-1] += took
    tally.pods[-1] += sum(len(spec.pods) for spec in specs)

    pinned = sum(
        (p.limit if p.limit is not None else max(1, s.workers)) for s in specs for p in s.pods if not p.reachable
    )
    if observed:
        total = sum(f.budget for f in result.fleets.values())
        room = max(0, facts.usable - facts.others)
        tally.checks += 1
        if total > room:
            if pinned > room - facts.observer:
                tally.pinned_over += 1
            else:
                tally.violations.append(f"server budgets {total} > usable - others {room}")
    for fleet, spec in zip(server.fleets, specs, strict=True):
        got = result.fleets[fleet.name]
        stuck = sum(p.limit or 0 for p in spec.pods if not p.reachable)
        tally.checks += 2
        if got.committed > got.budget and stuck <= got.budget:
            tally.violations.append(f"{fleet.name}: committed {got.committed} > budget {got.budget}")
        for pod in spec.pods:
            limit = got.limits[pod.name]
            if limit and limit < spec.workers:
                tally.violations.append(f"{pod.name}: limit {limit} below its {spec.workers} workers")
            if not observed and pod.limit is not None and limit > pod.limit:
                tally.violations.append(f"{pod.name}: rose to {limit} from {pod.limit} while unobserved")
        # The pods take their limits (an unreachable one keeps the last it had).
        for pod in fleet.pods:
            if pod.reachable:
                pod.limit = got.limits[pod.name]
        fleet.budget = got.budget


def run(servers: int, pgpools: int, max_pods: int, periods: int, seed: int) -> tuple[Tally, list[SimServer]]:
    rng = random.Random(seed)
    fleet = build(rng, servers, pgpools, max_pods)
    tally = Tally()
    for _ in range(periods):
        tally.times.append(0.0)
        tally.pods.append(0)
        for server in fleet:
            churn(rng, server, max_pods)
            step(server, tally)
        tally.periods += 1
    return tally, fleet


def report(args: argparse.Namespace, tally: Tally) -> str:
    times = tally.times[1:] or tally.times  # the first period warms up
    lines = [
        f"# Budget allocator simulation ({time.strftime('%Y-%m-%d')})",
        "",
        f"`benchmarks/budgetsim.py --servers {args.servers} --pgpools {args.pgpools} --max-pods {args.max_pods} "
        f"--periods {args.periods} --seed {args.seed}` on {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()} (one core; the allocator is pure Python).",
        "",
        "Churn every period: others' load walks (±5) and jumps (5% of servers), 1% of servers",
        "go unobserved for 1-3 periods, 2% of PgPools scale up and 2% down, 0.5% of pods",
        "become unreachable for 1-4 periods, 0.3% restart at the floor, demand walks and one",
        "pod in five PgPools gets a burst.",
        "",
        "| | |",
        "| --- | --- |",
        f"| servers x PgPools | {args.servers} x {args.pgpools} |",
        f"| pods per period | {min(tally.pods)} - {max(tally.pods)} (mean {statistics.mean(tally.pods):.0f}) |",
        f"| periods | {tally.periods} |",
        f"| invariant checks | {tally.checks} |",
        f"| violations | {len(tally.violations)} |",
        f"| periods where unreachable pods alone held more than a server's room | {tally.pinned_over} |",
        f"| one period, whole fleet: mean (CPU time) | {statistics.mean(times) * 1000:.0f} ms |",
        f"| one period, whole fleet: max (CPU time) | {max(times) * 1000:.0f} ms |",
        f"| one server's allocation: max (CPU time) | {tally.worst_server * 1000:.2f} ms |",
        "",
    ]
    if tally.violations:
        lines += ["Violations (first 20):", "", *(f"- {v}" for v in tally.violations[:20]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=200)
    parser.add_argument("--pgpools", type=int, default=50)
    parser.add_argument("--max-pods", type=int, default=100)
    parser.add_argument("--periods", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    tally, _ = run(args.servers, args.pgpools, args.max_pods, args.periods, args.seed)
    text = report(args, tally)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
