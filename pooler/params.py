"""Session parameters that follow a client from one server connection to the next."""

from __future__ import annotations

# The GUC_REPORT parameters a client can change and rely on: PostgreSQL reports each
# change with ParameterStatus, so the proxy always knows both the client's and the
# server's values and can SET the difference when a transaction lands on another server.
TRACKED = frozenset(
    (
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "IntervalStyle",
        "standard_conforming_strings",
        "application_name",
    )
)

# Startup parameters are case-sensitive on the wire, GUC names are not.
_CANONICAL = {name.lower(): name for name in TRACKED}


def canonical(name: str) -> str | None:
    """The tracked spelling of a parameter name, or None when it is not tracked."""
    return _CANONICAL.get(name.lower())


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sync_statement(client: dict[str, str], server: dict[str, str]) -> str | None:
    """SQL that makes the server's tracked parameters equal the client's, or None."""
    sets = [f'SET "{name}" = {quote_literal(value)}' for name, value in client.items() if server.get(name) != value]
    return ";".join(sets) if sets else None
