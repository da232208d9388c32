"""params.reported_value: the spelling PostgreSQL reports, checked against PostgreSQL itself."""

from __future__ import annotations

import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.pooler import params


def reported(conn: psycopg.Connection[tuple[object, ...]], name: str, value: str) -> str | None:
    """What PostgreSQL reports after SET `name` = `value` (None: it refuses the value)."""
    try:
        conn.execute(f"SET {name} = {params.quote_literal(value)}")
    except psycopg.Error:
        return None
    return conn.info.parameter_status(name)


def test_client_encoding_spellings_as_postgresql_reports_them(pg: TempPostgres) -> None:
    spellings = [*params._ENCODING_BY_KEY, "UTF-8", "utf_8", "Latin-1", "ISO-8859-15", "Windows-1252", "EUC-JP"]
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        # The lookup SET client_encoding makes, without switching this connection's encoding.
        cur = conn.execute(
            "SELECT s, pg_encoding_to_char(pg_char_to_encoding(s)) FROM unnest(%s::text[]) AS s", [spellings]
        )
        for spelling, server in cur.fetchall():
            assert server, spelling
            assert params.reported_value("client_encoding", spelling, "UTF8") == server, spelling
        assert reported(conn, "client_encoding", "utf-8") == "UTF8"
        assert params.reported_value("client_encoding", "no-such", "UTF8") == "no-such"


def test_datestyle_spellings_as_postgresql_reports_them(pg: TempPostgres) -> None:
    spellings = [
        "iso, dmy", "ISO", "dmy", "sql", "SQL, MDY", "postgres, ymd", "Postgres", "german", "German, YMD",
        "euro", "european", "us", "noneuropean", " iso ,  ymd ", "ymd, iso", "mdy, sql",
    ]  # fmt: skip
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for current in ("ISO, MDY", "SQL, DMY", "Postgres, YMD"):
            for spelling in spellings:
                assert reported(conn, "DateStyle", current) == current
                server = reported(conn, "DateStyle", spelling)
                assert server is not None, spelling
                assert params.reported_value("DateStyle", spelling, current) == server, (current, spelling)
        # What PostgreSQL refuses is passed on unchanged: its own error will say why.
        assert reported(conn, "DateStyle", "iso, german") is None
        assert params.reported_value("DateStyle", "iso, german", "ISO, MDY") == "iso, german"


def test_other_tracked_spellings(pg: TempPostgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for value in ("SQL_Standard", "ISO_8601", "postgres_VERBOSE"):
            assert params.reported_value("IntervalStyle", value, None) == reported(conn, "IntervalStyle", value)
        for value in ("TRUE", "yes", "0", "Off"):
            server = reported(conn, "standard_conforming_strings", value)
            assert params.reported_value("standard_conforming_strings", value, None) == server


def test_startup_options_split_as_postgresql_does() -> None:
    options = r"-c search_path=a,b  -cwork_mem=7MB --lock-timeout=3s -c application_name=two\ words"
    assert params.split_options(options) == [
        ("search_path", "a,b"),
        ("work_mem", "7MB"),
        ("lock_timeout", "3s"),
        ("application_name", "two words"),
    ]
    assert params.split_options("") == []
    with pytest.raises(ValueError, match="unsupported switch"):
        params.split_options("-B 100")
    with pytest.raises(ValueError, match="requires a value"):
        params.split_options("-c work_mem")
