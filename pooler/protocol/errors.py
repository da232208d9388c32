"""Protocol-level errors and the SQLSTATE codes the proxy answers with."""

from __future__ import annotations

# SQLSTATEs (PostgreSQL Appendix A) the proxy itself raises.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
INVALID_SQL_STATEMENT_NAME = "26000"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
FEATURE_NOT_SUPPORTED = "0A000"
IN_FAILED_SQL_TRANSACTION = "25P02"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
INTERNAL_ERROR = "XX000"


class ProtocolError(Exception):
    """Bytes that do not form a valid message; the peer that sent them is dropped."""

    def __init__(self, message: str, code: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.code = code


class StartupLengthError(ProtocolError):
    """A first packet whose length no startup packet has: not PostgreSQL's protocol at all.

    PostgreSQL closes such a connection without a word ("invalid length of startup
    packet" goes to its log only); node-postgres' quick connect()+end() sends Terminate
    before its startup packet and must see the same.
    """
