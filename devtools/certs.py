"""Certificates for TLS tests, made per run (trustme) and written to files clients and servers read.

One CA signs PostgreSQL's certificate (for "localhost" only, so that 127.0.0.1 is a wrong
host name for verify-full), the pooler's certificate (127.0.0.1 and localhost) and a
client certificate for `certuser`; a second CA is the unknown one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trustme


class Certs:
    """The run's CAs and certificates, written to files the pooler and clients read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = self._write("ca.crt", self.ca.cert_pem.bytes())
        self.other_ca_file = self._write("other-ca.crt", self.other_ca.cert_pem.bytes())
        self.pg_cert = self.ca.issue_cert("localhost")
        self.pooler_cert, self.pooler_key = self.issue("pooler", self.ca, "127.0.0.1", "localhost")
        self.client_cert, self.client_key = self.issue("certuser", self.ca, "certuser", common_name="certuser")

    def _write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def issue(self, name: str, ca: trustme.CA, *identities: str, **kwargs: Any) -> tuple[str, str]:
        cert = ca.issue_cert(*identities, **kwargs)
        chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
        return self._write(f"{name}.crt", chain), self._write(f"{name}.key", cert.private_key_pem.bytes())

    def postgres_tls(self) -> tuple[bytes, bytes, bytes]:
        """TempPostgres's `tls`: PostgreSQL's certificate chain, its key, the CA of client certificates."""
        chain = b"".join(pem.bytes() for pem in self.pg_cert.cert_chain_pems)
        return chain, self.pg_cert.private_key_pem.bytes(), self.ca.cert_pem.bytes()
