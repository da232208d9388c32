"""Messages a client (or the proxy, acting as one) sends: builders and parsers."""

from __future__ import annotations

from .framing import cstring, frame

TERMINATE = frame(b"X")
SYNC = frame(b"S")
FLUSH = frame(b"H")


def query(sql: str) -> bytes:
    return frame(b"Q", cstring(sql))


def password_message(password: str | bytes) -> bytes:
    raw = password.encode() if isinstance(password, str) else password
    return frame(b"p", raw + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstring(mechanism) + len(data).to_bytes(4, "big") + data)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def parse_query(body: bytes) -> str:
    end = body.find(b"\x00")
    return body[: end if end >= 0 else len(body)].decode(errors="replace")
