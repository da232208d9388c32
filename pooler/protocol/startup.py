"""The untyped packets a connection may open with: startup, SSL/GSS requests, cancel."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .errors import FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION, ProtocolError
from .framing import cstring, read_cstring

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


@dataclass(frozen=True, slots=True)
class StartupMessage:
    params: dict[str, str] = field(default_factory=dict)
    # A newer 3.x than 3.0 asked for, and `_pq_.` protocol options (left out of params):
    # the server answers both with NegotiateProtocolVersion and goes on with 3.0.
    minor_version: int = 0
    protocol_options: tuple[str, ...] = ()

    @property
    def needs_negotiation(self) -> bool:
        return self.minor_version > 0 or bool(self.protocol_options)

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        # PostgreSQL defaults the database to the user name.
        return self.params.get("database") or self.user


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Parse the body (after the length word) of a connection's first packet."""
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    code = int.from_bytes(body[:4], "big")
    if code == SSL_REQUEST_CODE and len(body) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(body) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolError("malformed cancel request")
        pid, key = struct.unpack("!ii", body[4:12])
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0",
            FEATURE_NOT_SUPPORTED,
        )
    params: dict[str, str] = {}
    options: list[str] = []
    pos = 4
    while True:
        if pos >= len(body):
            raise ProtocolError("startup packet has no terminator")
        if body[pos] == 0:
            break
        name, pos = read_cstring(body, pos)
        value, pos = read_cstring(body, pos)
        if name.startswith("_pq_."):
            options.append(name)  # none is supported (PostgreSQL knows none either)
        else:
            params[name] = value
    if "user" not in params or not params["user"]:
        raise ProtocolError("no PostgreSQL user name specified in startup packet", INVALID_AUTHORIZATION)
    return StartupMessage(params, minor, tuple(options))


def build_startup_message(params: dict[str, str]) -> bytes:
    body = PROTOCOL_V3.to_bytes(4, "big")
    body += b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return (len(body) + 4).to_bytes(4, "big") + body


def build_cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def build_ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)
