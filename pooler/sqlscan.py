"""What a client's SQL does to session state that a transaction pool cannot carry over.

A cheap test (`worth_a_look`) runs on every simple Query and Parse; the full look
(`scan`) only on the few statements that pass it. The scan is a tokenizer of statement
heads, not a parser: it may see a keyword inside a string literal and pin a client that
did not need it, which costs capacity, never correctness.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Final

from . import params
from .protocol.framing import type_table

# Reasons a client keeps its server (transaction mode turns into session mode for it).
LISTEN = "LISTEN"
SET = "SET"
ADVISORY = "session advisory lock"
HOLD_CURSOR = "WITH HOLD cursor"
TEMP_TABLE = "temporary table"
ALL_PINS = frozenset((LISTEN, SET, ADVISORY, HOLD_CURSOR, TEMP_TABLE))

_KEYWORDS = rb"(?:prepare|deallocate|discard|listen|unlisten|set|reset|declare|create|close)\b"
_SKIP = rb"(?:\s+|\(|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
# Final: compiled (mypyc), C statics rather than lookups in the module's dict.
_LEAD: Final = re.compile(_SKIP + _KEYWORDS, re.I | re.S)
_AFTER_SEMICOLON: Final = re.compile(rb";" + _SKIP + _KEYWORDS, re.I | re.S)

# The first four letters of each keyword but "set", lower-cased.
_HEADS: Final = frozenset((b"prep", b"deal", b"disc", b"list", b"unli", b"rese", b"decl", b"crea", b"clos"))
# The keywords' first letters but SET's (lower case), as a table indexed by byte
# (framing.type_table: compiled, a load rather than a set probe): a statement starting
# otherwise needs no closer look at its head.
_INITIALS: Final = type_table(b"pdlurc")
_LOWER_S: Final = ord("s")
_LOWER_T: Final = ord("t")
_SEMICOLON: Final = ord(";")
_LOWER_V: Final = ord("v")
_UPPER_V: Final = ord("V")
_LETTERS: Final = type_table(string.ascii_letters.encode())
_WORD_BYTES: Final = type_table((string.ascii_letters + string.digits + "_").encode())


def worth_a_look(data: bytes, start: int, end: int) -> bool:
    """True when the SQL in data[start:end] may touch session state (cheap, may say yes wrongly).

    It runs for every Query and Parse, so it avoids calls where it can: the head is
    judged by its letters, the rest by which bytes it holds.
    """
    if start >= end:
        return False
    first = data[start]
    if _LETTERS[first]:
        # Most statements start with their keyword: a few bytes answer without the regex.
        lower = first | 0x20
        # SELECT, the commonest of all, is told apart from SET at its third letter.
        third_t = end - start >= 3 and data[start + 2] | 0x20 == _LOWER_T
        if _INITIALS[lower] or (lower == _LOWER_S and third_t):
            head = data[start : min(start + 4, end)].lower()
            if head in _HEADS or (head[:3] == b"set" and (len(head) == 3 or not _WORD_BYTES[head[3]])):
                return True
    elif _LEAD.match(data, start, end):
        return True
    # One copy of the SQL, then a byte's presence asked first (`int in bytes` is a memchr;
    # `bytes in bytes` and bytes.find cost far more in calls than in searching). A
    # semicolon ending the SQL, as pgbench's and many a driver's do, is left out of the
    # copy: nothing follows it to look at, and a statement after one starts at one.
    sql = data[start : end - 1] if data[end - 1] == _SEMICOLON else data[start:end]
    if _SEMICOLON in sql and _AFTER_SEMICOLON.search(sql):
        return True
    if _LOWER_V in sql and sql.find(b"dvisory") >= 0:
        return True
    return _UPPER_V in sql and sql.find(b"DVISORY") >= 0


@dataclass(slots=True)
class SqlEffect:
    pins: set[str] = field(default_factory=set)
    unpins: set[str] = field(default_factory=set)
    refuse: str | None = None  # why the statement is refused
    # DEALLOCATE: the statement name, or None for ALL; only when it is the whole query.
    deallocate: tuple[str | None] | None = None
    discard_all: bool = False  # DISCARD ALL and nothing else
    deallocates: bool = False  # some DEALLOCATE / DISCARD ALL in a longer query

    def __bool__(self) -> bool:
        return bool(self.pins or self.unpins or self.refuse or self.deallocate or self.discard_all or self.deallocates)


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_WORD = re.compile(r'\s*("(?:[^"]|"")*"|[\w$.*]+|\S)')
_ADVISORY_CALL = re.compile(r"\bpg_(try_)?advisory_(xact_)?(lock|unlock)(_shared)?(_all)?\s*\(", re.I)
_ON_COMMIT_DROP = re.compile(r"\bon\s+commit\s+drop\b", re.I)
_WITH_HOLD = re.compile(r"\bwith\s+hold\b", re.I)


def _words(statement: str, limit: int = 6) -> list[str]:
    words: list[str] = []
    pos = 0
    while len(words) < limit:
        match = _WORD.match(statement, pos)
        if match is None:
            break
        words.append(match.group(1))
        pos = match.end()
    return words


def _identifier(word: str) -> str:
    if word.startswith('"') and word.endswith('"') and len(word) >= 2:
        return word[1:-1].replace('""', '"')
    return word.lower()


def scan(sql: str) -> SqlEffect:
    effect = SqlEffect()
    text = _COMMENTS.sub(" ", sql)
    statements = [s for s in (part.strip() for part in text.split(";")) if s.strip("( \t\r\n")]
    single = len(statements) == 1
    for call in _ADVISORY_CALL.finditer(text):
        xact, op, is_all = call.group(2), call.group(3).lower(), call.group(5)
        if xact:
            continue
        if op == "lock":
            effect.pins.add(ADVISORY)
        elif is_all:
            effect.unpins.add(ADVISORY)
    for statement in statements:
        words = [w.lower() if not w.startswith('"') else w for w in _words(statement.lstrip("( \t\r\n"))]
        if not words:
            continue
        head = words[0]
        if head == "prepare" and len(words) > 1 and words[1] != "transaction":
            effect.refuse = (
                "SQL PREPARE is not supported in transaction pooling mode; "
                "use the protocol's prepared statements (every driver's default), which pgfleet maps"
            )
        elif head == "deallocate":
            rest = words[1:]
            if rest and rest[0] == "prepare":
                rest = rest[1:]
            target: str | None = None if rest and rest[0] == "all" else (_identifier(rest[0]) if rest else "")
            if single and target != "":
                effect.deallocate = (target,)
            else:
                effect.deallocates = True
        elif head == "discard" and len(words) > 1:
            what = words[1]
            if what == "all":
                effect.unpins |= ALL_PINS
                if single:
                    effect.discard_all = True
                else:
                    effect.deallocates = True
            elif what in ("temp", "temporary"):
                effect.unpins.add(TEMP_TABLE)
        elif head == "listen":
            effect.pins.add(LISTEN)
        elif head == "unlisten" and len(words) > 1 and words[1] == "*":
            effect.unpins.add(LISTEN)
        elif head == "set" and len(words) > 1:
            name = words[1]
            if name == "session" and len(words) > 2 and words[2] != "characteristics":
                name = words[2]
            if name in ("local", "transaction", "constraints"):
                continue
            if params.canonical(_identifier(name)) is None:
                effect.pins.add(SET)
        elif head == "reset" and len(words) > 1 and words[1] == "all":
            effect.unpins.add(SET)
        elif head == "declare" and _WITH_HOLD.search(statement):
            effect.pins.add(HOLD_CURSOR)
        elif head == "close" and len(words) > 1 and words[1] == "all":
            effect.unpins.add(HOLD_CURSOR)
        elif head == "create" and _is_session_temp_table(words, statement):
            effect.pins.add(TEMP_TABLE)
    return effect


def _is_session_temp_table(words: list[str], statement: str) -> bool:
    rest = words[1:]
    if rest and rest[0] in ("global", "local"):
        rest = rest[1:]
    if not rest or rest[0] not in ("temp", "temporary"):
        return False
    return _ON_COMMIT_DROP.search(statement) is None
