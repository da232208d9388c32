"""The pooler process's log output: stderr, one write per turn of the event loop.

log_connections (on by default, as in PgBouncer) logs a line at each login and logout: a
connection storm logs thousands of lines a second. logging's StreamHandler flushes every
record (a write() per line, two per login); this handler keeps the lines formatted in one
turn of the event loop and writes them together at its end, and the formatter makes the
timestamp's text once per second. Records still go through logging (levels, filters,
other handlers). Outside a running loop (start-up, shutdown) a line is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TextIO


class StampCachingFormatter(logging.Formatter):
    """logging.Formatter whose default timestamp (`2026-12-03 17:40:01,123`) formats the
    date and time once per second rather than per record."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the lines of one event-loop turn together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        if not self._lines:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: at once
                self._write(line)
                return
            loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._lines = self._lines, []
            if os.getpid() != self._pid:
                # A forked child inherited the parent's lines: the parent writes them.
                self._pid = os.getpid()
                lines = []
            self._write("".join(lines))
        finally:
            self.release()

    def close(self) -> None:
        # Replaced (logging.basicConfig(force=True)) or closed at exit: what it holds goes out first.
        self.flush()
        super().close()

    def _write(self, text: str) -> None:
        # A log that cannot be written (stderr closed, a broken pipe) never stops the pooler.
        with contextlib.suppress(OSError, ValueError):
            if text:
                self.stream.write(text)
            self.stream.flush()
