"""SCRAM pass-through: logging in to PostgreSQL with the keys of a client's SCRAM exchange.

A SCRAM verifier (what pg_authid and auth_query hold) cannot answer a server's SCRAM
challenge: that needs the ClientKey, which only the password gives. But a client that
proves itself against the verifier sends ClientProof = ClientKey XOR ClientSignature, and
the pooler, which computes ClientSignature to check the proof, thereby learns ClientKey.
With it and the verifier's ServerKey the pooler logs in as that user, as PgBouncer does,
and no plaintext password is kept anywhere. The keys fit only a server whose verifier
has the same salt and iteration count (the same verifier the client was checked against).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from .auth import AuthFailed, ScramVerifier, xor


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What a client's SCRAM exchange taught the pooler; never logged (repr hides the keys)."""

    salt: bytes
    iterations: int
    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def learned(cls, verifier: ScramVerifier, client_key: bytes) -> ScramKeys:
        return cls(verifier.salt, verifier.iterations, client_key, verifier.server_key)

    def fits(self, verifier: ScramVerifier) -> bool:
        """Whether these keys were learned against `verifier` (the secret now on record)."""
        return (
            self.salt == verifier.salt
            and self.iterations == verifier.iterations
            and hmac.compare_digest(self.server_key, verifier.server_key)
            and hmac.compare_digest(hashlib.sha256(self.client_key).digest(), verifier.stored_key)
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ScramKeysExchange:
    """Client side of SCRAM-SHA-256 from keys rather than a password (ScramClientExchange's interface)."""

    def __init__(self, keys: ScramKeys) -> None:
        self._keys = keys
        self._nonce = _b64(secrets.token_bytes(18))
        # PostgreSQL takes the user from the startup packet; libpq sends an empty n= too.
        self._first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode()
            attributes = dict(part.split("=", 1) for part in text.split(","))
            nonce, salt, iterations = attributes["r"], base64.b64decode(attributes["s"]), int(attributes["i"])
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise AuthFailed("server sent a bad SCRAM message") from exc
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthFailed("server sent a bad SCRAM nonce")
        keys = self._keys
        if salt != keys.salt or iterations != keys.iterations:
            raise AuthFailed(
                "the server's SCRAM verifier for this user is not the one its client logged in with "
                "(password changed?); SCRAM pass-through cannot log in"
            )
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        stored_key = hashlib.sha256(keys.client_key).digest()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = xor(keys.client_key, signature)
        self._server_signature = hmac.digest(keys.server_key, auth_message, "sha256")
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        try:
            text = server_final.decode()
            given = base64.b64decode(text.split("v=", 1)[1].split(",")[0], validate=True)
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise AuthFailed("server sent a bad SCRAM final message") from exc
        if not hmac.compare_digest(given, self._server_signature):
            raise AuthFailed("server's SCRAM signature did not verify")
