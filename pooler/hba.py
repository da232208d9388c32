"""auth_type = hba: the authentication method per connection, from a pg_hba.conf-style file.

PgBouncer's subset of PostgreSQL's format: one rule per line, `local DATABASE USER METHOD`
or `host|hostssl|hostnossl DATABASE USER ADDRESS METHOD`, the first rule that matches
decides, and no match refuses the login. DATABASE and USER are `all` or comma lists
(`sameuser` for DATABASE); ADDRESS is `all`, a CIDR, or an address and a mask. Methods:
trust, reject, password, md5, scram-sha-256, and cert (the client certificate's CN must
be the user name). Options after the method, `@file` lists and `+group` members are not
read: a line that has them is an error naming the line, never a silently wider rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .config import AuthType, ConfigError, PoolerConfig

METHODS = frozenset({"trust", "reject", "password", "md5", "scram-sha-256", "cert"})
_KINDS = frozenset({"local", "host", "hostssl", "hostnossl"})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HbaRule:
    kind: str
    databases: frozenset[str] | None  # None: all
    users: frozenset[str] | None  # None: all
    network: Network | None  # None: all (or local)
    method: str
    where: str

    def matches(self, database: str, user: str, address: str, tls: bool) -> bool:
        local = address == "unix"
        if self.kind == "local":
            if not local:
                return False
        elif local or (self.kind == "hostssl" and not tls) or (self.kind == "hostnossl" and tls):
            return False
        databases = self.databases
        if databases is not None and database not in databases and not ("sameuser" in databases and database == user):
            return False
        if self.users is not None and user not in self.users:
            return False
        if self.network is not None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if ip.version != self.network.version or ip not in self.network:
                return False
        return True


def _names(field: str, where: str) -> frozenset[str] | None:
    names = [name.strip().strip('"') for name in field.split(",") if name.strip()]
    if any(name.startswith(("@", "+")) for name in names):
        raise ConfigError(f"{where}: @file and +group lists are not supported")
    return None if "all" in names else frozenset(names)


def _network(fields: list[str], where: str) -> tuple[Network | None, list[str]]:
    """The ADDRESS (and maybe MASK) fields, and what follows them."""
    first = fields[0]
    if first in ("all", "0.0.0.0/0", "::0/0"):
        return None, fields[1:]
    try:
        if "/" in first:
            return ipaddress.ip_network(first, strict=False), fields[1:]
        if len(fields) > 1:
            return ipaddress.ip_network(f"{first}/{fields[1]}", strict=False), fields[2:]
    except ValueError:
        pass
    raise ConfigError(f"{where}: not an address (CIDR, address and mask, or all): {first!r}")


def parse_hba(text: str, source: str) -> list[HbaRule]:
    rules = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        kind = fields[0]
        if kind not in _KINDS:
            raise ConfigError(f"{where}: unknown connection type {kind!r} (local, host, hostssl, hostnossl)")
        if len(fields) < (4 if kind == "local" else 5):
            raise ConfigError(f"{where}: too few fields")
        databases, users = _names(fields[1], where), _names(fields[2], where)
        network, rest = (None, fields[3:]) if kind == "local" else _network(fields[3:], where)
        if len(rest) != 1:
            raise ConfigError(f"{where}: expected the method alone after the address (options are not supported)")
        method = rest[0]
        if method not in METHODS:
            raise ConfigError(f"{where}: method {method!r} is not supported (one of {', '.join(sorted(METHODS))})")
        rules.append(HbaRule(kind, databases, users, network, method, where))
    return rules


def load_hba(path: str) -> list[HbaRule]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"auth_hba_file: cannot read {path}: {exc.strerror}") from None
    return parse_hba(text, path)


def method_for(rules: list[HbaRule], database: str, user: str, address: str, tls: bool) -> str | None:
    """The method of the first rule that matches; None: no rule does (the login is refused)."""
    for rule in rules:
        if rule.matches(database, user, address, tls):
            return rule.method
    return None


def rules_for(config: PoolerConfig) -> list[HbaRule]:
    """The rules a config runs with (none unless auth_type is hba); a ConfigError names the line."""
    if config.auth_type is not AuthType.HBA or not config.auth_hba_file:
        return []
    return load_hba(config.auth_hba_file)
