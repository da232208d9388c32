"""Password checks for clients and password answers to servers (md5, SCRAM-SHA-256).

SCRAM itself is scramp's; this module only adapts it to the stored secrets PgBouncer's
auth_file may hold: plaintext, `md5<hex>` and `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from scramp import ScramClient, ScramException, ScramMechanism

from .shares import random_bytes

SCRAM = "SCRAM-SHA-256"
# Per process: the mock SCRAM salts of unknown users derive from it (ScramServerExchange.mock).
_MOCK_SECRET = secrets.token_bytes(32)
_SALT_LENGTH = 16  # SCRAM_DEFAULT_SALT_LEN, PostgreSQL's
_MECHANISM = ScramMechanism(SCRAM)


class AuthFailed(Exception):
    """The peer's proof did not match; the message is safe to show to the client."""


def md5_secret(user: str, password: str) -> str:
    """PostgreSQL's stored md5 form: 'md5' + md5(password || user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password, from a plaintext or md5 secret."""
    inner = secret if is_md5(secret) else md5_secret(user, secret)
    return "md5" + hashlib.md5(inner[3:].encode() + salt).hexdigest()


def is_md5(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5")


def is_scram(secret: str) -> bool:
    return secret.startswith(SCRAM + "$")


def is_plaintext(secret: str) -> bool:
    return not (is_md5(secret) or is_scram(secret))


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int


@functools.lru_cache(maxsize=1024)
def parse_scram_secret(secret: str) -> ScramVerifier:
    # Cached: a storm logs the same users in again and again (the verifier is immutable).
    try:
        _, iter_salt, keys = secret.split("$")
        iterations, salt = iter_salt.split(":")
        stored, server = keys.split(":")
        return ScramVerifier(
            base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations)
        )
    except ValueError as exc:
        raise AuthFailed("malformed SCRAM secret in auth_file") from exc


@functools.lru_cache(maxsize=1024)
def _verifier_for_password(password: str) -> ScramVerifier:
    # PBKDF2 with 4096 rounds costs milliseconds; a connection storm would pay it per
    # login, so the verifier derived from a plaintext secret is computed once.
    # A 16-byte salt, as PostgreSQL's (and the mock exchange's): scramp's default is 32,
    # and a salt of another length would tell a user from auth_file from an unknown one.
    salt, stored, server, iterations = _MECHANISM.make_auth_info(password, salt=os.urandom(_SALT_LENGTH))
    return ScramVerifier(salt, stored, server, iterations)


def scram_verifier(secret: str) -> ScramVerifier:
    if is_scram(secret):
        return parse_scram_secret(secret)
    if is_md5(secret):
        raise AuthFailed("SCRAM authentication needs a plaintext or SCRAM secret, auth_file has md5")
    return _verifier_for_password(secret)


def xor(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two strings of the same length."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class ScramServerExchange:
    """Server side of one SCRAM-SHA-256 exchange with a client (RFC 5802/7677, no binding).

    Written here rather than taken from scramp because scramp's server rejects the
    empty `n=` user name that libpq sends (PostgreSQL takes the user from the startup
    packet, never from SCRAM); the key derivation is still scramp's.
    """

    def __init__(self, verifier: ScramVerifier) -> None:
        self._verifier = verifier
        # Set once the client's proof checks out: what SCRAM pass-through logs in with.
        self.client_key = b""
        self._nonce = ""
        self._auth_prefix = ""
        self._gs2_header = ""

    @classmethod
    def mock(cls, user: str) -> ScramServerExchange:
        """An exchange for a user without a usable secret: it looks like any other and fails
        at its end. The salt is derived from the user name and a secret of this process, so
        that asking twice gives the same salt (as PostgreSQL's mock authentication)."""
        salt = hmac.new(_MOCK_SECRET, user.encode(), hashlib.sha256).digest()[:_SALT_LENGTH]
        # Keys no proof can match: random, never derived from any password.
        return cls(ScramVerifier(salt, secrets.token_bytes(32), secrets.token_bytes(32), 4096))

    @classmethod
    def for_secret(cls, secret: str) -> ScramServerExchange:
        return cls(scram_verifier(secret))

    def first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode()
            flag, authzid, bare = text.split(",", 2)
        except (UnicodeDecodeError, ValueError) as exc:
            raise AuthFailed("malformed SCRAM client-first message") from exc
        if flag not in ("n", "y") or authzid:
            raise AuthFailed("SCRAM channel binding and authorization identities are not supported")
        client_nonce = ""
        for part in bare.split(","):  # (the last r= counts, as in a dict of the attributes)
            if part.startswith("r="):
                client_nonce = part[2:]
        if not client_nonce or len(client_nonce) > 1024:
            raise AuthFailed("malformed SCRAM client nonce")
        verifier = self._verifier
        self._gs2_header = f"{flag},{authzid},"
        self._nonce = client_nonce + base64.b64encode(random_bytes(18)).decode()
        server_first = f"r={self._nonce},s={base64.b64encode(verifier.salt).decode()},i={verifier.iterations}"
        self._auth_prefix = f"{bare},{server_first},"
        return server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        try:
            text = client_final.decode()
            without_proof, proof_part = text.rsplit(",p=", 1)
            nonce: str | None = None
            channel: str | None = None
            for part in without_proof.split(","):  # (the last of each counts)
                name, equals, value = part.partition("=")
                if not equals:
                    raise ValueError("SCRAM attribute without a value")
                if name == "r":
                    nonce = value
                elif name == "c":
                    channel = value
            if channel is None:
                raise KeyError("c")
            proof = base64.b64decode(proof_part, validate=True)
            binding = base64.b64decode(channel, validate=True).decode()
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise AuthFailed("malformed SCRAM client-final message") from exc
        if nonce != self._nonce or binding != self._gs2_header:
            raise AuthFailed("SCRAM nonce or channel binding mismatch")
        verifier = self._verifier
        auth_message = (self._auth_prefix + without_proof).encode()
        # hmac.digest: OpenSSL's one-shot HMAC, without the hmac.HMAC object per call.
        client_signature = hmac.digest(verifier.stored_key, auth_message, "sha256")
        if len(proof) != len(client_signature):
            raise AuthFailed("SCRAM proof has the wrong length")
        client_key = xor(proof, client_signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
            raise AuthFailed("SCRAM proof did not match")
        self.client_key = client_key
        server_signature = hmac.digest(verifier.server_key, auth_message, "sha256")
        return ("v=" + base64.b64encode(server_signature).decode()).encode()


class ScramClientExchange:
    """Client side of SCRAM-SHA-256 when the proxy logs in to a server."""

    def __init__(self, user: str, password: str) -> None:
        self._client = ScramClient([SCRAM], user, password)

    def first(self) -> bytes:
        return str(self._client.get_client_first()).encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            self._client.set_server_first(server_first.decode())
            return str(self._client.get_client_final()).encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(f"server sent a bad SCRAM message: {exc}") from exc

    def verify(self, server_final: bytes) -> None:
        try:
            self._client.set_server_final(server_final.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(f"server's SCRAM signature did not verify: {exc}") from exc


# Compared as bytes: hmac.compare_digest refuses str holding anything but ASCII.


def check_plain_password(user: str, secret: str, given: bytes) -> bool:
    """A cleartext password (auth_type plain) against any stored secret form; empty never matches."""
    if not given or not secret:
        return False
    if is_md5(secret):
        digest = "md5" + hashlib.md5(given + user.encode()).hexdigest()
        return hmac.compare_digest(digest.encode(), secret.encode())
    if is_scram(secret):
        verifier = parse_scram_secret(secret)
        password = given.decode(errors="replace")
        _, stored, _, _ = _MECHANISM.make_auth_info(password, verifier.iterations, verifier.salt)
        return hmac.compare_digest(stored, verifier.stored_key)
    return hmac.compare_digest(secret.encode(), given)


def check_md5_password(user: str, secret: str, salt: bytes, given: bytes) -> bool:
    """A client's md5 answer; a secret that is empty, or the md5 of an empty password, never matches."""
    if not secret or secret == md5_secret(user, ""):
        return False
    return hmac.compare_digest(md5_response(user, secret, salt).encode(), given)
