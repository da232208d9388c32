"""The extended-query codec and the SQL scan, bytes in and bytes out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgfleet.pooler import client, sqlscan
from pgfleet.pooler.protocol import backend, extended


def test_parse_bytes_and_back() -> None:
    msg = extended.parse("s1", "SELECT $1", [23])
    assert msg == b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"
    assert extended.split_parse(msg[5:]) == ("s1", b"SELECT $1\x00\x00\x01\x00\x00\x00\x17")
    assert extended.parse_renamed("pgf_x", b"SELECT 1\x00\x00\x00") == b"P\x00\x00\x00\x15pgf_x\x00SELECT 1\x00\x00\x00"


def test_bind_describe_close_execute() -> None:
    msg = extended.bind("", "s1")
    assert msg == b"B\x00\x00\x00\x0e\x00s1\x00\x00\x00\x00\x00\x00\x00"
    assert extended.describe(extended.STATEMENT, "s1") == b"D\x00\x00\x00\x08Ss1\x00"
    assert extended.close(extended.PORTAL, "") == b"C\x00\x00\x00\x06P\x00"
    assert extended.execute("", 0) == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"


def test_rewrite_error_changes_message_and_detail_only() -> None:
    body = backend.error_response("42P05", 'prepared statement "pgf_ab" already exists', detail='see "pgf_ab"')[5:]
    out = extended.rewrite_error(body, lambda text: text.replace("pgf_ab", "s1"))
    fields = backend.parse_error_fields(out)
    assert fields["M"] == 'prepared statement "s1" already exists'
    assert fields["D"] == 'see "s1"'
    assert fields["C"] == "42P05" and fields["S"] == "ERROR"
    assert out.endswith(b"\x00\x00")
    # A body without its terminator gets one; nothing else is invented.
    assert extended.rewrite_error(b"Mx", lambda t: t + "y") == b"Mxy\x00\x00"


@pytest.mark.parametrize(
    ("sql", "pins", "unpins"),
    [
        ("LISTEN jobs", {sqlscan.LISTEN}, set()),
        ("UNLISTEN *", set(), {sqlscan.LISTEN}),
        ("SET search_path = app", {sqlscan.SET}, set()),
        ("set session work_mem = '8MB'", {sqlscan.SET}, set()),
        ("SET LOCAL work_mem = '8MB'", set(), set()),
        ("SET application_name = 'x'", set(), set()),  # tracked: follows the client
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", set(), set()),
        ("RESET ALL", set(), {sqlscan.SET}),
        ("SELECT pg_advisory_lock(1)", {sqlscan.ADVISORY}, set()),
        ("SELECT pg_try_advisory_lock_shared(1)", {sqlscan.ADVISORY}, set()),
        ("SELECT pg_advisory_xact_lock(1)", set(), set()),
        ("SELECT pg_advisory_unlock_all()", set(), {sqlscan.ADVISORY}),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", {sqlscan.HOLD_CURSOR}, set()),
        ("DECLARE c CURSOR FOR SELECT 1", set(), set()),
        ("CLOSE ALL", set(), {sqlscan.HOLD_CURSOR}),
        ("CREATE TEMP TABLE t (x int)", {sqlscan.TEMP_TABLE}, set()),
        ("create temporary table t (x int) on commit drop", set(), set()),
        ("DISCARD TEMP", set(), {sqlscan.TEMP_TABLE}),
        ("BEGIN; LISTEN x; COMMIT", {sqlscan.LISTEN}, set()),
        ("/* hi */ LISTEN x", {sqlscan.LISTEN}, set()),
    ],
)
def test_scan_pins(sql: str, pins: set[str], unpins: set[str]) -> None:
    data = sql.encode()
    effect = sqlscan.scan(sql)
    assert effect.pins == pins
    assert effect.unpins == unpins
    if pins or unpins:
        assert sqlscan.worth_a_look(data, 0, len(data))


def test_scan_statements_and_refusals() -> None:
    assert sqlscan.scan("DEALLOCATE s1").deallocate == ("s1",)
    assert sqlscan.scan('deallocate prepare "S_1"').deallocate == ("S_1",)
    assert sqlscan.scan("DEALLOCATE ALL").deallocate == (None,)
    assert sqlscan.scan("DEALLOCATE a; SELECT 1").deallocates
    assert sqlscan.scan("DISCARD ALL").discard_all
    assert sqlscan.scan("PREPARE p AS SELECT 1").refuse
    assert not sqlscan.scan("PREPARE TRANSACTION 'x'").refuse
    assert not sqlscan.scan("SELECT 'set'")
    for cheap in (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;", b"BEGIN", b"INSERT INTO t VALUES (1)"):
        assert not sqlscan.worth_a_look(cheap, 0, len(cheap))
    for cheap in (b"select 1", b"SeLeCt 1", b"s", b"se", b"SHOW x", b"UPDATE t SET x = 1", b"(SELECT 1)"):
        assert not sqlscan.worth_a_look(cheap, 0, len(cheap))
    for costly in (
        b"set x = 1",
        b"sEt x = 1",
        b"SET",
        b"Reset all",
        b"select pg_advisory_lock(1)",
        b"SELECT 1; SET x = 1",
    ):
        assert sqlscan.worth_a_look(costly, 0, len(costly))


_WORDS = ["SELECT", "select", "Set", "set", "SET", "setx", "RESET", "listen", "UNLISTEN", "Declare", "CURSOR",
          "WITH", "HOLD", "for", "create", "TEMP", "temporary", "TABLE", "discard", "ALL", "prepare", "deallocate",
          "close", "pg_advisory_lock(1)", "PG_ADVISORY_LOCK(1)", "x", "1", "=", "to", "'s'", "SESSION"]  # fmt: skip
_GLUE = ["", " ", "  ", "\n", "(", ";", "; ", "/* c */", "-- c\n"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_GLUE), st.sampled_from(_WORDS)), max_size=8),
    st.binary(max_size=8),
    st.binary(max_size=8),
)
def test_worth_a_look_never_misses_what_the_scan_finds(
    parts: list[tuple[str, str]], before: bytes, after: bytes
) -> None:
    """The cheap test may say yes wrongly, never no wrongly: whatever the full scan acts on
    passes it, wherever in a buffer the SQL sits (its bounds, not the bytes around it, count)."""
    sql = "".join(glue + word for glue, word in parts)
    effect = sqlscan.scan(sql)
    data = before + sql.encode() + after
    if effect:
        assert sqlscan.worth_a_look(data, len(before), len(before) + len(sql.encode())), sql


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=6).map(lambda b: b.replace(b"\x00", b"n")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"q")),
    st.lists(st.sampled_from([0, 23, 25, 1 << 24, 0x01000000 + 23]), max_size=4),
    st.binary(max_size=6),
)
def test_parse_sql_end_is_its_nul(name: bytes, sql: bytes, types: list[int], after: bytes) -> None:
    """The SQL of a Parse ends at its first NUL, whatever its parameter types (OID 0, the
    commonest, ends the message with the same zero bytes a Parse without types does)."""
    body = name + b"\x00" + sql + b"\x00" + struct.pack(f"!h{len(types)}I", len(types), *types)
    data = b"P" + struct.pack("!i", len(body) + 4) + body + after
    start, end = 5 + len(name) + 1, 5 + len(body)
    assert client._parse_query_end(data, start, end) == data.find(b"\x00", start, end) == start + len(sql)
