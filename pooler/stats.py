"""Counters a pool keeps, in PgBouncer's terms (SHOW STATS), and per-connection facts."""

from __future__ import annotations

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
