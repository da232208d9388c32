"""auth_query and SCRAM pass-through: no plaintext password of the users anywhere.

The session's PostgreSQL demands SCRAM from `scramuser` and md5 from `md5user`
(tempdb.HBA_METHODS); the pooler's auth_file holds only `auth_user`'s entry, so a login
that reaches the server as `scramuser` proves the pooler logged in with the keys of the
client's own SCRAM exchange.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import client_env, run_cmd
from pgfleet.pooler.userlist import dump_userlist

from .conftest import StartPooler


def auth_query_settings(tmp_path: Path, **more: Any) -> dict[str, Any]:
    userlist = tmp_path / "auth-userlist.txt"
    userlist.write_text(dump_userlist({"postgres": ""}))
    # md5: an md5 secret gets the md5 challenge, a SCRAM verifier SCRAM (as PostgreSQL does).
    return {"auth_type": "md5", "auth_file": str(userlist), "auth_user": "postgres", **more}


async def psql(port: int, user: str, password: str, sql: str = "SELECT current_user") -> tuple[int, str, str]:
    return await run_cmd(
        "psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", user, "app", "-c", sql,
        env=client_env(password),
    )  # fmt: skip


async def test_psql_asyncpg_psycopg_log_in_through_auth_query(
    tmp_path: Path, start_pooler: StartPooler, caplog: pytest.LogCaptureFixture
) -> None:
    pooler = await start_pooler(**auth_query_settings(tmp_path), verbose=1)
    assert "scramuser" not in pooler.userlist
    with caplog.at_level(logging.DEBUG):
        code, out, err = await psql(pooler.port, "scramuser", "scrampass")
        assert (code, out.strip()) == (0, "scramuser"), err
        code, out, err = await psql(pooler.port, "md5user", "md5pass")
        assert (code, out.strip()) == (0, "md5user"), err
        conn = await asyncpg.connect(
            host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", database="app",
            statement_cache_size=0,
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT current_user") == "scramuser"
        finally:
            await conn.close()
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=pooler.port, user="scramuser", password="scrampass", dbname="app",
        ) as pconn:  # fmt: skip
            cur = await pconn.execute("SELECT current_user")
            assert await cur.fetchone() == ("scramuser",)
    # One lookup per user: the other logins were answered from the cache.
    assert pooler.credentials.lookups == 2
    # The secrets never reach the log.
    verifier = pooler.credentials.server_secret("md5user")
    assert isinstance(verifier, str) and verifier.startswith("md5")
    assert verifier not in caplog.text and "SCRAM-SHA-256$" not in caplog.text


async def test_wrong_password_and_unknown_user_get_the_same_answer(tmp_path: Path, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**auth_query_settings(tmp_path))
    code, _, wrong = await psql(pooler.port, "scramuser", "nope")
    assert code != 0 and 'password authentication failed for user "scramuser"' in wrong, wrong
    code, _, unknown = await psql(pooler.port, "nosuchuser", "nope")
    assert code != 0 and 'password authentication failed for user "nosuchuser"' in unknown, unknown
    code, out, err = await psql(pooler.port, "scramuser", "scrampass")
    assert (code, out.strip()) == (0, "scramuser"), err


async def test_pgbench_reconnecting_through_auth_query(tmp_path: Path, start_pooler: StartPooler) -> None:
    pooler = await start_pooler(**auth_query_settings(tmp_path))
    script = tmp_path / "select.sql"
    script.write_text("SELECT current_user;\n")
    code, out, err = await run_cmd(
        "pgbench", "-C", "-c", "2", "-j", "2", "-t", "20", "-n", "-f", str(script),
        "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "scramuser", "app",
        env=client_env("scrampass"),
    )  # fmt: skip
    assert code == 0, err + out
    assert "number of transactions actually processed: 40/40" in out
    assert pooler.credentials.lookups == 1


async def test_scram_pass_through_from_a_verifier_in_auth_file(
    pg: TempPostgres, tmp_path: Path, start_pooler: StartPooler
) -> None:
    """auth_file holds scramuser's SCRAM verifier, as pg_authid does: no plaintext anywhere."""
    verifier = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scramuser'")
    userlist = tmp_path / "verifiers.txt"
    userlist.write_text(dump_userlist({"scramuser": verifier}))
    pooler = await start_pooler(auth_type="scram-sha-256", auth_file=str(userlist))
    for _ in range(2):
        code, out, err = await psql(pooler.port, "scramuser", "scrampass")
        assert (code, out.strip()) == (0, "scramuser"), err


async def test_auth_query_through_a_security_definer_function(
    pg: TempPostgres, tmp_path: Path, start_pooler: StartPooler
) -> None:
    """The setup PgBouncer's docs recommend: an unprivileged auth_user calling a function."""
    pg.sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgfleet_auth') THEN "
        "CREATE ROLE pgfleet_auth LOGIN; END IF; END $$;"
        "CREATE OR REPLACE FUNCTION public.pgfleet_lookup(p_user text, OUT usename name, OUT passwd text) "
        "RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS "
        "$$ SELECT usename, passwd FROM pg_shadow WHERE usename = p_user $$;"
        "REVOKE ALL ON FUNCTION public.pgfleet_lookup(text) FROM PUBLIC;"
        "GRANT EXECUTE ON FUNCTION public.pgfleet_lookup(text) TO pgfleet_auth;"
    )
    userlist = tmp_path / "auth-userlist.txt"
    userlist.write_text(dump_userlist({"pgfleet_auth": ""}))
    pooler = await start_pooler(
        auth_type="md5", auth_file=str(userlist), auth_user="pgfleet_auth", auth_dbname="postgres",
        auth_query="SELECT usename, passwd FROM public.pgfleet_lookup($1)",
    )  # fmt: skip
    code, out, err = await psql(pooler.port, "scramuser", "scrampass")
    assert (code, out.strip()) == (0, "scramuser"), err
    # The unprivileged role cannot read pg_shadow itself: the default query fails, and says so.
    plain = await start_pooler(auth_type="md5", auth_file=str(userlist), auth_user="pgfleet_auth")
    code, _, err = await psql(plain.port, "md5user", "md5pass")
    assert code != 0 and "auth_query failed: permission denied" in err, err
