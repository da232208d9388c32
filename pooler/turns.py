"""Reading one buffer per turn of the event loop, for client and server links alike.

uvloop (libuv) reads a socket up to 32 times in one turn of the loop while each read
fills its 256 kB buffer: a peer that keeps its socket full (a long message, a COPY, a
large result) would hold the loop for 8 MB of copying while every other connection
waits. After a read this large a link yields its turn: its reading pauses and resumes on
the loop's next turn, after the loop has looked at everyone else's sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

# A literal (64 KiB): the compiled build puts it into the code of every test against it,
# in the modules that import it too (hot paths compare each read's length with it).
YIELD_AFTER: Final = 65536


class Link(Protocol):
    """A client or server connection, as far as taking turns goes."""

    _reading_paused: bool
    _yielding: bool  # reading paused until the loop's next turn

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def reading_held(self) -> bool:
        """Something other than the turn holds reading (back-pressure, a full queue):
        that resumes it, not the turn's end."""
        ...


def yield_turn(link: Link, call_soon: Callable[..., Any]) -> None:
    """Stop reading `link` until the loop's next turn (after a read of YIELD_AFTER or more)."""
    if link._reading_paused or link._yielding:
        return
    link._yielding = True
    link.pause_reading()
    call_soon(_end_turn, link)


def _end_turn(link: Link) -> None:
    link._yielding = False
    if not link.reading_held():
        link.resume_reading()
