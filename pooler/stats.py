"""Counters a pool keeps, in PgBouncer's terms (SHOW STATS), and per-connection facts."""

from __future__ import annotations

from typing import Final

# The counters by name; compiled (mypyc), the class has fixed attributes but no __slots__.
COUNTERS = (
    "bind_count",
    "bytes_received",
    "bytes_sent",
    "client_parse_count",
    "errors",
    "prepared_hits",
    "prepared_misses",
    "query_count",
    "query_time",
    "server_assignment_count",
    "server_parse_count",
    "wait_count",
    "wait_time",
    "xact_count",
    "xact_time",
)


class PoolStats:
    """Totals since start; times are microseconds, as PgBouncer reports them."""

    __slots__ = COUNTERS

    def __init__(self) -> None:
        self.xact_count = 0  # SQL transactions ended (ReadyForQuery 'I' with nothing outstanding)
        self.server_assignment_count = 0  # a server handed to a client and taken back
        self.query_count = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.xact_time = 0
        self.query_time = 0
        self.wait_time = 0
        self.wait_count = 0
        self.errors = 0
        self.client_parse_count = 0
        self.server_parse_count = 0
        self.bind_count = 0
        self.prepared_hits = 0
        self.prepared_misses = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


# Seconds; a client that waits more than a few ms is already a sign of a tight pool.
# Not Final: compiled, a Final tuple of literals is a constant that another module-level
# value cannot be made from at import (mypyc leaves its static unset).
WAIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# The same as a list: compiled, its items are read by index without an iterator.
_BOUNDS: Final[list[float]] = list(WAIT_BUCKETS)
# Every bound is a whole number of 100 µs units. For a wait of at least u whole units,
# _SKIP[u] counts the bounds below u units: the wait is past each of them, so observe()
# starts its walk there and compares against one or two bounds instead of up to sixteen.
_UNITS_PER_SECOND: Final = 10_000.0
_SKIP_TO: Final = 1_000  # waits past 100 ms (rare) start at the last entry
_SKIP: Final[bytes] = bytes(
    sum(1 for bound in WAIT_BUCKETS if round(bound * 10_000) < units) for units in range(1_000 + 1)
)


class WaitHistogram:
    """How long a pool's clients waited for a server: counts per bucket (not cumulative)
    and the sum, for pgfleet_client_wait_seconds.

    Kept by the pool itself (compiled, a few compares per wait) rather than by an observer
    the pool would call: with 200 clients on 20 servers nearly every transaction waits.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(WAIT_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # A short walk, not bisect: compiled, native float compares from where _SKIP
        # says (bisect would box the float and look itself up per call).
        units = int(seconds * _UNITS_PER_SECOND)
        index = _SKIP[min(units, _SKIP_TO)] if units > 0 else 0
        last = len(_BOUNDS)
        while index < last and seconds > _BOUNDS[index]:
            index += 1
        self.counts[index] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, WAIT_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
