"""PgBouncer's auth_file format: one `"user" "secret"` pair per line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .config import ConfigError


def _quoted(line: str, pos: int, lineno: int, source: str) -> tuple[str, int]:
    # A quoted token; a doubled quote inside it stands for one quote.
    while pos < len(line) and line[pos].isspace():
        pos += 1
    if pos >= len(line) or line[pos] != '"':
        raise ConfigError(f"{source}:{lineno}: expected a double-quoted value")
    pos += 1
    out = []
    while pos < len(line):
        ch = line[pos]
        if ch == '"':
            if pos + 1 < len(line) and line[pos + 1] == '"':
                out.append('"')
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(ch)
        pos += 1
    raise ConfigError(f"{source}:{lineno}: unterminated quoted value")


def parse_userlist(text: str, source: str = "<auth_file>") -> dict[str, str]:
    users: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        name, pos = _quoted(line, 0, lineno, source)
        secret, _ = _quoted(line, pos, lineno, source)
        users[name] = secret
    return users


def dump_userlist(users: Mapping[str, str]) -> str:
    """The text `parse_userlist` reads back: quotes inside a value are doubled."""
    return "".join(
        '"{}" "{}"\n'.format(user.replace('"', '""'), secret.replace('"', '""')) for user, secret in users.items()
    )


def load_userlist(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read auth_file: {exc.strerror}") from None
    return parse_userlist(text, path)
