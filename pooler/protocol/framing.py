"""Framing: splitting a byte stream into messages (type byte + int32 length + body)."""

from __future__ import annotations

from typing import Final

from .errors import ProtocolError, StartupLengthError

# PostgreSQL itself refuses startup packets over 10000 bytes; regular messages may be
# large (COPY data, big Bind values), so they get a generous but finite bound to keep a
# malicious length from making the proxy buffer gigabytes.
MAX_STARTUP_LENGTH = 10_000
MAX_MESSAGE_LENGTH: Final = 1 << 30  # Final: a constant in compiled (mypyc) callers


def type_table(types: bytes) -> bytes:
    """A 256-byte table, 1 at each message type in `types`: `table[msg_type]` tells membership.

    Compiled (mypyc), indexing bytes with a native int is a bounds check and a load, where
    `msg_type in frozenset` boxes the int, hashes it and probes the set.
    """
    return bytes(1 if i in types else 0 for i in range(256))


class StartupReader:
    """Collects the one untyped packet a connection starts with (length + body)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        # Only while a packet arrives in pieces: most come whole in one read, and are
        # sliced from it without a buffer.
        self._buf: bytearray | None = None

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Return (packet body, bytes left over) once the packet is complete."""
        buf = self._buf
        if buf is not None:
            buf += data
            data = bytes(buf)
        if len(data) < 4:
            self._hold(data)
            return None
        length = (data[0] << 24) | (data[1] << 16) | (data[2] << 8) | data[3]
        if length < 8 or length > MAX_STARTUP_LENGTH:
            raise StartupLengthError(f"invalid length of startup packet: {length}")
        if len(data) < length:
            self._hold(data)
            return None
        self._buf = None
        return data[4:length], data[length:]

    def _hold(self, data: bytes) -> None:
        if self._buf is None:
            self._buf = bytearray(data)  # (else it holds `data` already)


class MessageReader:
    """Splits a stream of typed messages; keeps a partial message between feeds.

    `messages()` yields `(type, body)` for every complete message and leaves an
    incomplete tail buffered for the next `feed`.
    """

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    def messages(self) -> list[tuple[int, bytes]]:
        buf = self._buf
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if length < 4 or length > self.max_length:
                raise ProtocolError(f"invalid message length {length} for type {chr(buf[pos])!r}")
            stop = pos + 1 + length
            if stop > end:
                break
            out.append((buf[pos], bytes(buf[pos + 5 : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out

    def take_raw(self) -> bytes:
        """Everything buffered, unparsed (used when handing a stream over)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


def frame(msg_type: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (counting itself), body."""
    return msg_type + (len(body) + 4).to_bytes(4, "big") + body


def cstring(value: str) -> bytes:
    return value.encode() + b"\x00"


def read_cstring(data: bytes, pos: int) -> tuple[str, int]:
    """Decode a NUL-terminated string at `pos`; return it and the position after it."""
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string in message")
    try:
        return data[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError("string in message is not valid UTF-8") from exc
