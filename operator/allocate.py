"""The dynamic budget: what each fleet on one PostgreSQL server may hold now, and each pod's part.

Pure arithmetic over one observation of the server and of the pods (no sockets, no
Kubernetes), so it is tested as data and run by the simulation in benchmarks/.

One period, for one server (host, port):

1. usable   = max_connections - superuser_reserved_connections - reserved_connections
   headroom = usable - others - observer - reserve   (reserve: the largest any fleet asks)
2. each fleet's cap = min(maxBackends, maxBackendsPercent x usable) - its reserve, and what its role's and
   its database's CONNECTION LIMIT leave after others' backends there); the headroom is
   shared max-min fair over the caps, weighted by `weight`: a fleet whose cap is below
   its share leaves the rest to the others. A fleet whose unreachable pods still hold
   more than its share keeps that much (it cannot be taken back) and the others share
   what is left. The sum over the server never exceeds usable - others.
3. each fleet's budget is split over its pods: every pod a floor (its worker count, so
   every worker can serve), room for `surge` pods at the floor, the rest by demand
   (servers busy + clients waiting): max-min fair when they ask for more than there is,
   else each at least what it asks and the rest evenly; an unreachable pod counts at the
   limit it last confirmed. Hysteresis keeps a pod's limit when the new one is within
   `hysteresis` of it, the fleet's total unchanged.
4. When the server could not be observed nothing may grow: budgets and limits can only
   go down from what is in force.

The invariant: for every fleet, the sum of its pods' limits plus its surge room is at
most its budget, and the budgets of a server sum to at most usable - others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """One observation of a PostgreSQL server."""

    max_connections: int
    superuser_reserved: int = 3
    reserved: int = 0  # reserved_connections (PostgreSQL 16+); 0 before
    others: int = 0  # client backends that are neither a fleet's nor the observer's
    observer: int = 1  # the controller's own kept connection
    # CONNECTION LIMIT of roles and databases the fleets use (absent or -1: none), and
    # how many of others' backends count against each.
    role_limits: Mapping[str, int] = field(default_factory=dict)
    database_limits: Mapping[str, int] = field(default_factory=dict)
    others_by_role: Mapping[str, int] = field(default_factory=dict)
    others_by_database: Mapping[str, int] = field(default_factory=dict)

    @property
    def usable(self) -> int:
        return max(0, self.max_connections - self.superuser_reserved - self.reserved)


@dataclass(frozen=True, slots=True)
class PodState:
    """What a pod said in its last GET /status (or, unreachable, what it last confirmed)."""

    name: str
    limit: int | None = None  # the limit in force it confirmed; None: never confirmed (a new pod)
    reachable: bool = True
    held: int = 0  # server connections it holds now
    active: int = 0  # of those, linked to a client
    waiting: int = 0  # clients queued for a server

    @property
    def demand(self) -> int:
        """Backends it could use right now."""
        return self.active + self.waiting


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """One PgPool (or the standalone controller's one fleet) and its pods."""

    name: str
    role: str = ""
    database: str = ""
    max_backends: int | None = None
    max_backends_percent: int | None = None
    reserve: int = 0
    weight: int = 1
    workers: int = 1  # each pod's floor: one backend per worker
    surge: int = 0  # pods that may start beyond the running ones (kept at the floor)
    pods: Sequence[PodState] = ()
    budget: int | None = None  # the budget in force, for when the server cannot be observed


class Reason(str, Enum):
    """Why a fleet's budget is not what it asks; the value is the condition reason."""

    SQUEEZED = "Squeezed"  # others leave it less than its spec
    OVERCOMMITTED = "Overcommitted"  # its pods hold more than the budget
    UNOBSERVED = "DatabaseUnobserved"  # nothing may grow until the server is seen again


@dataclass(frozen=True, slots=True)
class FleetBudget:
    name: str
    budget: int  # backends the fleet may hold now
    wanted: int  # what its spec and connection limits alone allow
    limits: dict[str, int]  # pod name -> pool limit (0, or at least `workers`)
    floor: int  # the limit of a pod that starts now (the ConfigMap's)
    surge_room: int  # backends kept for pods that may start (surge x floor, or less)
    held: int  # backends its pods hold now
    waiting: int  # clients waiting over its pods
    reasons: tuple[Reason, ...] = ()

    @property
    def committed(self) -> int:
        """Most backends the fleet can hold with these limits, surge included."""
        return sum(self.limits.values()) + self.surge_room


@dataclass(frozen=True, slots=True)
class ServerBudget:
    usable: int | None
    others: int | None
    headroom: int | None
    fleets: dict[str, FleetBudget]


# -- max-min fair sharing -------------------------------------------------------------------


def water_fill(capacity: int, caps: Mapping[str, int], weights: Mapping[str, int] | None = None) -> dict[str, int]:
    """Share `capacity` max-min fair among `caps`, weighted; integers, never above a cap.

    Whoever's cap is below its weighted share gets its cap, and the rest is shared again
    among the others. The remainder after integer shares goes one by one to the largest
    fractional parts (ties by name), so the result is deterministic.
    """
    out = {name: 0 for name in caps}
    weight = {name: max(1, (weights or {}).get(name, 1)) for name in caps}
    # Ascending by cap per unit of weight: whoever is capped below the level is settled
    # first, in one pass (n log n, not a round per capped fleet).
    order = sorted((name for name, cap in caps.items() if cap > 0), key=lambda n: (caps[n] / weight[n], n))
    remaining = max(0, capacity)
    total_weight = sum(weight[name] for name in order)
    i = 0
    while i < len(order) and caps[order[i]] * total_weight <= remaining * weight[order[i]]:
        name = order[i]
        out[name] = caps[name]
        remaining -= caps[name]
        total_weight -= weight[name]
        i += 1
    rest = order[i:]
    if rest and remaining > 0:
        share = {name: remaining * weight[name] / total_weight for name in rest}
        whole = {name: int(share[name]) for name in rest}
        for name, amount in whole.items():
            out[name] = amount
        left = remaining - sum(whole.values())
        for name in sorted(rest, key=lambda n: (-(share[n] - whole[n]), n))[:left]:
            out[name] += 1
    return out


# -- one fleet's cap --------------------------------------------------------------------------


def spec_cap(fleet: FleetSpec, usable: int) -> int:
    """The most its spec allows on a server with `usable` backends (no spec: all of them).

    As the PgPool's budget.total has always said: the smaller form, less the reserve.
    """
    caps = [usable]
    if fleet.max_backends is not None:
        caps.append(fleet.max_backends)
    if fleet.max_backends_percent is not None:
        caps.append(usable * fleet.max_backends_percent // 100)
    return max(0, min(caps) - fleet.reserve)


def _group_caps(server: ServerFacts, fleets: Sequence[FleetSpec], caps: dict[str, int]) -> dict[str, int]:
    """Caps lowered so that fleets sharing a limited role or database fit its CONNECTION LIMIT.

    The room a limit leaves (limit - others' backends under it) is shared max-min fair
    among the fleets under it, each at most its own cap.
    """
    out = dict(caps)
    groups: list[tuple[int, list[FleetSpec]]] = []
    for limits, others, key in (
        (server.role_limits, server.others_by_role, "role"),
        (server.database_limits, server.others_by_database, "database"),
    ):
        members: dict[str, list[FleetSpec]] = {}
        for fleet in fleets:
            members.setdefault(getattr(fleet, key), []).append(fleet)
        for name, group in members.items():
            limit = limits.get(name, -1)
            if limit is not None and limit >= 0:
                groups.append((max(0, limit - others.get(name, 0)), group))
    for room, group in groups:
        shares = water_fill(room, {f.name: out[f.name] for f in group}, {f.name: f.weight for f in group})
        out.update(shares)
    return out


# -- splitting a budget over pods ---------------------------------------------------------------


def split(budget: int, fleet: FleetSpec, *, hysteresis: int = 1, grow: bool = True) -> tuple[dict[str, int], int, int]:
    """(pod limits, floor, surge room) for `budget`; see the module docstring."""
    floor = max(1, fleet.workers)
    # Not reachable: at the limit it last confirmed, or (never confirmed) the ConfigMap's floor.
    pinned = {p.name: floor if p.limit is None else p.limit for p in fleet.pods if not p.reachable}
    live = [p for p in fleet.pods if p.reachable]
    free = budget - sum(pinned.values())
    limits: dict[str, int] = dict(pinned)
    # Floors first, busiest pods first, while they fit.
    order = sorted(live, key=lambda p: (-p.demand, p.name))
    for pod in order:
        limits[pod.name] = floor if free >= floor else 0
        free -= limits[pod.name]
    surge_room = min(fleet.surge, max(0, free) // floor) * floor
    free -= surge_room
    fed = [p for p in live if limits[p.name]]
    if free > 0 and fed:
        extra = _above_floor(free, {p.name: max(0, p.demand - floor) for p in fed})
        for pod in fed:
            limits[pod.name] += extra[pod.name]
    if not grow:
        # The server is not observed: nothing may rise above what is in force.
        for pod in live:
            if pod.limit is not None:
                limits[pod.name] = min(limits[pod.name], pod.limit)
    _hold_steady(limits, live, hysteresis, floor)
    return limits, floor, surge_room


def _above_floor(free: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Share `free` backends above the floors by what each pod asks (servers busy + clients waiting).

    Short (they ask for more than there is): max-min fair over what they ask. Otherwise every
    pod gets at least what it asks, and the rest evenly, so that a burst finds servers
    already allowed: a pod whose demand is below that even level gets exactly the level,
    whatever its demand, so the noise in how busy a pod happens to be at a /status does not
    move its limit.
    """
    if sum(wants.values()) >= free:
        return water_fill(free, wants)
    out: dict[str, int] = {}
    order = sorted(wants, key=lambda n: (-wants[n], n))
    # The busiest pods whose demand is above the even level of what is left keep their demand.
    i = 0
    while i < len(order) and wants[order[i]] * (len(order) - i) > free:
        out[order[i]] = wants[order[i]]
        free -= wants[order[i]]
        i += 1
    rest = order[i:]
    each, odd = divmod(free, len(rest)) if rest else (0, 0)
    for i, name in enumerate(sorted(rest)):
        out[name] = each + (1 if i < odd else 0)  # the odd ones by name: the same pods every period
    return out


def _hold_steady(limits: dict[str, int], live: Sequence[PodState], hysteresis: int, floor: int) -> None:
    """Keep the limits in force where moving them serves nobody; the fleet's total as the split made it.

    Every pod has what it needs (its demand, up to its new limit, and its floor) and the
    total is the split's: nothing moves, however its demand swings between two /status
    reads; the room of a pod whose demand dipped for a moment stays where the load is.
    Otherwise each pod whose new limit is within `hysteresis` of the one in force keeps
    it, and the total is made right again one backend at a time among those same pods,
    toward their new limits: the budget holds, nothing is left unused, the fewest pods
    move. Two pods whose new limits merely trade an odd backend keep theirs.
    """
    if hysteresis <= 0 or not live:
        return
    # One pass: whether every pod has what it needs, the totals, and the pods within the band.
    satisfied, before, after = True, 0, 0
    band: list[PodState] = []
    for pod in live:
        current, target = pod.limit, limits[pod.name]
        after += target
        if current is None:
            satisfied = False
            continue
        before += current
        if satisfied:
            need = max(floor, min(target, pod.demand)) if target >= floor else 0
            satisfied = current >= need and (current == 0 or current >= floor)
        if current != target and abs(current - target) <= hysteresis and min(current, target) >= floor:
            band.append(pod)  # a pod's floor is never held back, nor kept past a squeeze
    if satisfied and before == after:
        limits.update((p.name, p.limit or 0) for p in live)
        return
    band.sort(key=lambda p: p.name)
    wanted = {p.name: limits[p.name] for p in band}
    residual = 0  # backends the kept limits leave unused (> 0) or take beyond the split's total (< 0)
    for pod in band:
        residual += limits[pod.name] - (pod.limit or 0)
        limits[pod.name] = pod.limit or 0
    while residual:
        step = 1 if residual > 0 else -1
        # Those furthest from their new limit move first; ties by name, so the same pods each period.
        movers = sorted(
            (n for n in wanted if (wanted[n] - limits[n]) * step > 0),
            key=lambda n: (-abs(wanted[n] - limits[n]), n),
        )
        for name in movers[: abs(residual)]:
            limits[name] += step
            residual -= step


# -- the whole server ----------------------------------------------------------------------------


def allocate_server(server: ServerFacts | None, fleets: Sequence[FleetSpec], *, hysteresis: int = 1) -> ServerBudget:
    """Budgets and pod limits for every fleet on one server; `server` None: it was not observed."""
    if server is None:
        return _unobserved(fleets, hysteresis)
    usable = server.usable
    reserve = max((f.reserve for f in fleets), default=0)
    headroom = max(0, usable - server.others - server.observer - reserve)
    wanted = _group_caps(server, fleets, {f.name: spec_cap(f, usable) for f in fleets})
    weights = {f.name: f.weight for f in fleets}
    # What unreachable pods hold cannot be taken back this period: it comes off the top.
    stuck = {
        f.name: sum(max(1, f.workers) if p.limit is None else p.limit for p in f.pods if not p.reachable)
        for f in fleets
    }
    fixed: dict[str, int] = {}
    shares = water_fill(headroom, wanted, weights)
    while over := {name for name in wanted if name not in fixed and stuck[name] > shares[name]}:
        fixed.update((name, stuck[name]) for name in over)
        rest = {name: cap for name, cap in wanted.items() if name not in fixed}
        shares = {**water_fill(headroom - sum(fixed.values()), rest, weights), **fixed}
    out = {}
    for fleet in fleets:
        budget = shares[fleet.name]
        squeezed = [Reason.SQUEEZED] if budget < wanted[fleet.name] else []
        out[fleet.name] = _fleet_budget(fleet, budget, wanted[fleet.name], squeezed, hysteresis=hysteresis)
    return ServerBudget(usable=usable, others=server.others, headroom=headroom, fleets=out)


def _unobserved(fleets: Sequence[FleetSpec], hysteresis: int) -> ServerBudget:
    out = {}
    for fleet in fleets:
        in_force = sum(p.limit or 0 for p in fleet.pods)
        budget = fleet.budget if fleet.budget is not None else in_force
        out[fleet.name] = _fleet_budget(fleet, budget, budget, [Reason.UNOBSERVED], hysteresis=hysteresis, grow=False)
    return ServerBudget(usable=None, others=None, headroom=None, fleets=out)


def _fleet_budget(
    fleet: FleetSpec, budget: int, wanted: int, reasons: list[Reason], *, hysteresis: int, grow: bool = True
) -> FleetBudget:
    """The fleet's budget split over its pods; OVERCOMMITTED joins `reasons` when it holds more."""
    limits, floor, surge = split(budget, fleet, hysteresis=hysteresis, grow=grow)
    held = sum(p.held for p in fleet.pods)
    if held > budget:
        reasons = [*reasons, Reason.OVERCOMMITTED]
    return FleetBudget(
        name=fleet.name,
        budget=budget,
        wanted=wanted,
        limits=limits,
        floor=floor,
        surge_room=surge,
        held=held,
        waiting=sum(p.waiting for p in fleet.pods),
        reasons=tuple(reasons),
    )
