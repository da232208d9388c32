"""What one worker process owns when `workers` > 1: its share of every limit, its cancel keys.

Each worker runs a whole pooler with its own pools, so the fleet-wide promise (never more
than `pool_size` backends for a pool) holds only if the workers' limits add up to the
configured ones. `share` splits a limit so that the shares sum to it exactly and differ by
at most one; the config refuses a limit smaller than the number of workers, which would
leave a worker with none.

Cancel keys carry their owner: a CancelRequest arrives on whichever worker the kernel
picks for that new connection, and the key's process id (≡ worker index mod workers)
says which sibling to pass it to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PID_LIMIT = 1 << 31  # BackendKeyData's process id is an Int32 that clients treat as positive


# Random bytes for cancel keys are drawn from the OS this many at a time: one getrandom
# per 64 logins rather than one per login (a storm logs in thousands of times a second).
_RANDOM_BATCH = 512


class _RandomBytes:
    """The OS's random bytes, drawn ahead in batches and handed out 8 at a time, each once.

    A forked worker must never hand out bytes its parent or a sibling also holds (two
    clients would get the same secret): the child forgets the batch at fork."""

    __slots__ = ("_data", "_pos")

    def __init__(self) -> None:
        self._data = b""
        self._pos = 0

    def take64(self) -> tuple[int, int]:
        """Eight bytes as two unsigned 32-bit numbers (big-endian): byte by byte, compiled,
        native reads and small integers, no call and no 64-bit integer object."""
        pos = self._pos
        data = self._data
        if pos + 8 > len(data):
            data = self._data = os.urandom(_RANDOM_BATCH)
            pos = 0
        self._pos = pos + 8
        high = (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
        low = (data[pos + 4] << 24) | (data[pos + 5] << 16) | (data[pos + 6] << 8) | data[pos + 7]
        return high, low

    def take(self, n: int) -> bytes:
        """`n` bytes (at most _RANDOM_BATCH), from the batch."""
        pos = self._pos
        data = self._data
        if pos + n > len(data):
            data = self._data = os.urandom(_RANDOM_BATCH)
            pos = 0
        self._pos = pos + n
        return data[pos : pos + n]

    def forget(self) -> None:
        self._data = b""
        self._pos = 0


_RANDOM = _RandomBytes()
os.register_at_fork(after_in_child=_RANDOM.forget)


def random_bytes(n: int) -> bytes:
    """`n` bytes of the OS's random source (at most 512), drawn ahead in batches: a
    connection storm's nonces cost no system call each."""
    return _RANDOM.take(n)


def share(limit: int, index: int, count: int) -> int:
    """Worker `index`'s part of `limit` among `count` workers; 0 (unlimited or none) stays 0."""
    if count == 1 or limit == 0:
        return limit
    return limit // count + (1 if index < limit % count else 0)


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """This process's place among the workers. The single-process pooler is worker 0 of 1."""

    index: int = 0
    count: int = 1
    control_dir: Path | None = None  # where the workers' private sockets live

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} out of range for {self.count} workers")

    @property
    def single(self) -> bool:
        return self.count == 1

    def portion(self, limit: int) -> int:
        return share(limit, self.index, self.count)

    def new_cancel_key(self) -> tuple[int, int]:
        """BackendKeyData's (process id, secret key): a random nonzero process id that names
        this worker (pid % count == index) and a random signed 32-bit secret, both from 8
        bytes of the OS's random source (a connection storm asks for one per login)."""
        while True:
            high, low = _RANDOM.take64()
            pid = (high % (_PID_LIMIT // self.count)) * self.count + self.index
            if pid:
                return pid, low - (1 << 31)

    def owner_of(self, pid: int) -> int:
        return pid % self.count

    def cancel_socket(self, index: int) -> Path:
        """The private socket on which worker `index` takes cancel requests passed on by siblings."""
        assert self.control_dir is not None
        return self.control_dir / f"worker-{index}.sock"

    @property
    def http_socket(self) -> Path:
        """The private socket of this worker's control port, which the supervisor fronts."""
        assert self.control_dir is not None
        return self.control_dir / f"http-{self.index}.sock"

    @property
    def limits_file(self) -> Path | None:
        """Limits changed by PUT /limits since the last reload, for a worker that starts again."""
        return self.control_dir / "limits.json" if self.control_dir is not None else None

    @property
    def paused_file(self) -> Path | None:
        """The supervisor's pause ("1" or "0"), which a worker starting (again) takes over its config's."""
        return self.control_dir / "paused" if self.control_dir is not None else None

    @classmethod
    def parse(cls, text: str, control_dir: str | None) -> WorkerSlot:
        """`I/N` from the command line, as the supervisor passes it."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--worker expects INDEX/COUNT, got {text!r}") from None
        return cls(index, count, Path(control_dir) if control_dir else None)
