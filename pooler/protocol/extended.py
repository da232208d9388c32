"""Extended-query messages the proxy reads, rewrites or makes up: Parse, Bind, Describe,
Close, Execute.

Only what the statement mapping needs is decoded: names. Query text, parameter type
OIDs, parameter values and result formats stay raw bytes, copied through unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from .framing import cstring, frame, read_cstring

STATEMENT = ord("S")
PORTAL = ord("P")


# -- builders ---------------------------------------------------------------------------------


def parse(name: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    body = cstring(name) + cstring(query) + struct.pack(f"!h{len(param_types)}I", len(param_types), *param_types)
    return frame(b"P", body)


def parse_renamed(name: str, rest: bytes) -> bytes:
    """A Parse for statement `name` whose query and parameter types are `rest`, as read."""
    return frame(b"P", cstring(name) + rest)


def bind(portal: str, statement: str, tail: bytes = b"\x00\x00\x00\x00\x00\x00") -> bytes:
    """A Bind; `tail` is everything after the statement name (formats, values, result formats).

    The default tail binds no parameters and asks for default result formats.
    """
    return frame(b"B", cstring(portal) + cstring(statement) + tail)


def describe(kind: int, name: str) -> bytes:
    return frame(b"D", bytes((kind,)) + cstring(name))


def close(kind: int, name: str) -> bytes:
    return frame(b"C", bytes((kind,)) + cstring(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstring(portal) + struct.pack("!i", max_rows))


# -- parsers ----------------------------------------------------------------------------------


def split_parse(body: bytes) -> tuple[str, bytes]:
    """Statement name and the rest of a Parse body (query, parameter types) as raw bytes."""
    name, pos = read_cstring(body, 0)
    return name, body[pos:]


# -- error rewriting ----------------------------------------------------------------------------


def rewrite_error(body: bytes, rewrite: Callable[[str], str]) -> bytes:
    """An ErrorResponse body whose message and detail fields went through `rewrite`.

    Other fields are copied byte for byte; a body that lacks its final terminator gets one.
    """
    out = bytearray()
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = body[pos]
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            end = len(body)
        value = body[pos + 1 : end]
        if code in (ord("M"), ord("D")):
            value = rewrite(value.decode(errors="replace")).encode()
        out.append(code)
        out += value
        out.append(0)
        pos = end + 1
    out.append(0)
    return bytes(out)
