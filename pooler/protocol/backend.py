"""Messages a server (or the proxy, acting as one) sends: builders and parsers."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ProtocolError
from .framing import cstring, frame, read_cstring

# Authentication request codes ('R' messages).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# ReadyForQuery transaction status bytes.
IDLE = ord("I")
IN_TRANSACTION = ord("T")
FAILED_TRANSACTION = ord("E")


def authentication_ok() -> bytes:
    return frame(b"R", struct.pack("!i", AUTH_OK))


def authentication_cleartext() -> bytes:
    return frame(b"R", struct.pack("!i", AUTH_CLEARTEXT))


def authentication_md5(salt: bytes) -> bytes:
    return frame(b"R", struct.pack("!i", AUTH_MD5) + salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    body = struct.pack("!i", AUTH_SASL) + b"".join(cstring(m) for m in mechanisms) + b"\x00"
    return frame(b"R", body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return frame(b"R", struct.pack("!i", AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return frame(b"R", struct.pack("!i", AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstring(name) + cstring(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return frame(b"K", struct.pack("!ii", process_id, secret_key))


_READY = {status: frame(b"Z", bytes([status])) for status in (IDLE, IN_TRANSACTION, FAILED_TRANSACTION)}


def ready_for_query(status: int = IDLE) -> bytes:
    return _READY[status]


def error_response(
    code: str,
    message: str,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse. `severity` is ERROR, FATAL or PANIC."""
    return frame(b"E", _notice_fields(code, message, severity, detail, hint))


def notice_response(code: str, message: str, severity: str = "NOTICE") -> bytes:
    return frame(b"N", _notice_fields(code, message, severity, None, None))


def _notice_fields(code: str, message: str, severity: str, detail: str | None, hint: str | None) -> bytes:
    fields = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(code) + b"M" + cstring(message)
    if detail:
        fields += b"D" + cstring(detail)
    if hint:
        fields += b"H" + cstring(hint)
    return fields + b"\x00"


def command_complete(tag: str) -> bytes:
    return frame(b"C", cstring(tag))


def empty_query_response() -> bytes:
    return frame(b"I")


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    body = struct.pack("!h", len(columns))
    for name, type_oid in columns:
        # table oid, column attnum, type oid, type size, type modifier, format (text)
        body += cstring(name) + struct.pack("!ihihih", 0, 0, type_oid, -1, -1, 0)
    return frame(b"T", body)


def data_row(values: Sequence[str | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            body += b"\xff\xff\xff\xff"
        else:
            raw = value.encode()
            body += struct.pack("!i", len(raw)) + raw
    return frame(b"D", body)


@dataclass(frozen=True, slots=True)
class AuthRequest:
    code: int
    data: bytes  # md5 salt, SASL mechanisms list or SASL payload


def parse_authentication(body: bytes) -> AuthRequest:
    if len(body) < 4:
        raise ProtocolError("short authentication message")
    return AuthRequest(int.from_bytes(body[:4], "big"), body[4:])


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    names, pos = [], 0
    while pos < len(data) and data[pos] != 0:
        name, pos = read_cstring(data, pos)
        names.append(name)
    return names


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError("malformed BackendKeyData")
    pid, key = struct.unpack("!ii", body)
    return pid, key


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code.

    Tolerates a missing SQLSTATE or a missing terminator (PgBouncer's CVE-2021-3935
    lesson: never trust a server's error to be complete).
    """
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        key = chr(body[pos])
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            end = len(body)
        fields[key] = body[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def negotiate_protocol_version(minor: int, options: tuple[str, ...] | list[str]) -> bytes:
    """NegotiateProtocolVersion: the newest 3.x minor version supported, and the protocol
    options (`_pq_.*`) of the startup packet that are not."""
    body = (3 << 16 | minor).to_bytes(4, "big") + len(options).to_bytes(4, "big")
    return frame(b"v", body + b"".join(cstring(name) for name in options))
