"""Driver behaviours run three ways: directly, through session mode, through transaction mode.

Each behaviour (psycopg calls as its own test suite makes them, and node-postgres cases
from tests/pooler/node/conformance.js) returns what the driver saw; the report lists the
behaviours whose result through the pooler differs from the direct one. A measuring tool,
not a test (tests/pooler/test_driver_conformance.py holds the cases CI runs):

    python -P -m pgfleet.devtools.driver_behaviours                  # this checkout's pooler
    python -P -m pgfleet.devtools.driver_behaviours --commit REV     # the pooler as of REV

It starts its own PostgreSQL and two poolers (session mode, pool of 2; transaction mode,
pool of 4), and needs psycopg, and node with tests/pooler/node installed for the node cases.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from pgfleet.devtools.procs import free_port
from pgfleet.devtools.tempdb import TempPostgres
from psycopg import pq
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.enum import EnumInfo, register_enum
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "tests" / "pooler" / "node" / "conformance.js"

Behaviour = Callable[[str, int], Any]
BEHAVIOURS: dict[str, Behaviour] = {}


def err(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    return f"{type(exc).__name__}:{getattr(diag, 'sqlstate', None)}"


def behaviour(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    BEHAVIOURS[fn.__name__] = lambda dsn, port: fn(dsn)
    return fn


def rolled_back(fn: Callable[[psycopg.Connection[Any]], Any]) -> Callable[[str], Any]:
    """A behaviour on one connection, psycopg's defaults: what `fn` saw inside its transaction,
    which is rolled back before the connection closes (so nothing it made outlives it)."""

    @functools.wraps(fn)
    def run(dsn: str) -> Any:
        with psycopg.connect(dsn) as c:
            result = fn(c)
            c.rollback()
            return result

    return behaviour(run)


def recovered(c: psycopg.Connection[Any]) -> Any:
    """ROLLBACK of a failed transaction, then whether the connection serves again."""
    c.rollback()
    return c.execute("select 1").fetchone()


@behaviour
def close_in_transaction_leaks(dsn: str) -> Any:
    c1 = psycopg.connect(dsn)
    c1.execute("set search_path = pg_catalog")
    c1.execute("select pg_advisory_lock(42)")
    c1.execute("listen leaked")
    c1.execute("create temp table leaked (x int)")
    c1.commit()
    c1.execute("select 1", prepare=True)
    c1.close()
    with psycopg.connect(dsn, autocommit=True) as c2:
        return [
            c2.execute(r"select count(*) from pg_prepared_statements where name not like 'pgf\_%'").fetchone(),
            c2.execute("show search_path").fetchone(),
            c2.execute("select count(*) from pg_locks where locktype='advisory' and pid=pg_backend_pid()").fetchone(),
            c2.execute("select count(*) from pg_listening_channels()").fetchone(),
            c2.execute("select count(*) from pg_class where relnamespace = pg_my_temp_schema()").fetchone(),
            c2.execute("select 1", prepare=True).fetchone(),
        ]


@behaviour
def close_in_transaction_prepare_twice(dsn: str) -> Any:
    out: list[Any] = []
    for _ in range(3):
        with psycopg.connect(dsn) as c:
            out.append(c.execute("select %s::int", [1], prepare=True).fetchone())
            c.execute("select 2", prepare=True)
            # leave without commit: the context manager commits, so close() by hand
            c.close()
    return out


@behaviour
def datestyle_env(dsn: str) -> Any:
    os.environ.update(PGDATESTYLE="iso, dmy", PGCLIENTENCODING="utf-8")
    try:
        with psycopg.connect(dsn) as c:
            return [
                c.info.parameter_status("DateStyle"),
                c.info.parameter_status("client_encoding"),
                c.execute("select '2024-03-04'::date").fetchone(),
            ]
    finally:
        del os.environ["PGDATESTYLE"], os.environ["PGCLIENTENCODING"]


@behaviour
def timezone_env(dsn: str) -> Any:
    os.environ["PGTZ"] = "europe/rome"
    try:
        with psycopg.connect(dsn) as c:
            c.execute("select 1")
            return [c.info.parameter_status("TimeZone"), str(c.info.timezone)]
    finally:
        del os.environ["PGTZ"]


@behaviour
def enum_after_rollback(dsn: str) -> Any:
    out: list[Any] = []
    with psycopg.connect(dsn, prepare_threshold=0) as c:
        for _ in range(3):
            try:
                c.execute("create type prepenum as enum ('foo', 'bar')")
                out.append(c.execute("select %s::prepenum", ["foo"]).fetchone())
            except psycopg.Error as e:
                out.append(err(e))
            c.rollback()
    with psycopg.connect(dsn, prepare_threshold=0) as c:
        c.execute("create type prepenum as enum ('foo', 'bar')")
        out.append(c.execute("select %s::prepenum", ["foo"]).fetchone())
        c.rollback()
    return out


@rolled_back
def register_enum_roundtrip(c: psycopg.Connection[Any]) -> Any:
    c.execute("create type mood as enum ('sad', 'ok', 'happy')")
    info = EnumInfo.fetch(c, "mood")
    assert info is not None
    register_enum(info, c)
    r: Any = c.execute("select 'ok'::mood, %s::mood[]", [["sad", "happy"]]).fetchone()
    return [str(r[0]), [str(x) for x in r[1]]]


@rolled_back
def composite_roundtrip(c: psycopg.Connection[Any]) -> Any:
    c.execute("create type pair as (a int, b text)")
    composite = CompositeInfo.fetch(c, "pair")
    assert composite is not None
    register_composite(composite, c)
    r: Any = c.execute("select (1, 'x')::pair").fetchone()
    r = r[0]
    return [r.a, r.b]


@behaviour
def pipeline_error_then_more(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgconn = c.pgconn
        c.execute("begin")
        c.execute("savepoint sp")
        c.pgconn.prepare(b"s1", b"select 1")
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"select 1/0", None)
        pgconn.send_flush_request()
        pgconn.flush()
        results: list[int] = []
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                r = pgconn.get_result()
                if r is None:
                    break
                results.append(r.status)
            else:
                select.select([pgconn.socket], [], [], 1)
        pgconn.send_query_params(b"select 2", None)
        pgconn.pipeline_sync()
        pgconn.flush()
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                select.select([pgconn.socket], [], [], 1)
                continue
            r = pgconn.get_result()
            if r is None:
                continue
            results.append(r.status)
            if r.status == pq.ExecStatus.PIPELINE_SYNC:
                break
        pgconn.exit_pipeline_mode()
        c.execute("rollback to savepoint sp")
        r = pgconn.exec_prepared(b"s1", None)
        results.append(r.status)
        c.execute("rollback")
        return [int(s) for s in results]


@behaviour
def psycopg_pipeline_error(dsn: str) -> Any:
    out: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as c:
        try:
            with c.pipeline():
                c.execute("select 1")
                c.execute("select 1/0")
                c.execute("select 2")
        except psycopg.Error as e:
            out.append(err(e))
        out.append(c.execute("select 3").fetchone())
        with c.pipeline():
            cur = c.execute("select %s::int", [4], prepare=True)
            cur2 = c.execute("select %s::int", [5], prepare=True)
        out += [cur.fetchone(), cur2.fetchone()]
    return out


@behaviour
def terminate_self(dsn: str) -> Any:
    c = psycopg.connect(dsn, autocommit=True)
    try:
        c.execute("select pg_terminate_backend(pg_backend_pid())")
        return "no error"
    except psycopg.Error as e:
        return [err(e), c.closed, c.info.status.name]
    finally:
        c.close()


@behaviour
def terminate_self_in_transaction(dsn: str) -> Any:
    c = psycopg.connect(dsn)
    try:
        c.execute("select 1")
        c.execute("select pg_terminate_backend(pg_backend_pid())")
        return "no error"
    except psycopg.Error as e:
        return [err(e), c.closed]
    finally:
        c.close()


@behaviour
def startup_options(dsn: str) -> Any:
    with psycopg.connect(dsn, options="-c search_path=pg_catalog -c statement_timeout=1234") as c:
        r: list[Any] = [c.execute("show search_path").fetchone(), c.execute("show statement_timeout").fetchone()]
        c.commit()
        r.append(c.execute("show statement_timeout").fetchone())
        try:
            c.execute("select pg_sleep(3)")
        except psycopg.Error as e:
            r.append(err(e))
        return r


@behaviour
def startup_options_invalid(dsn: str) -> Any:
    try:
        with psycopg.connect(dsn, options="-c statement_timeout=soon") as c:
            c.execute("select 1")
            return "accepted"
    except psycopg.Error as e:
        return type(e).__name__ in ("OperationalError", "InvalidParameterValue") and "statement_timeout" in str(e)


@behaviour
def application_name(dsn: str) -> Any:
    with psycopg.connect(dsn, application_name="harness") as c:
        return [c.info.parameter_status("application_name"), c.execute("show application_name").fetchone()]


@behaviour
def server_cursor_and_hold(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        with c.cursor("named") as cur:
            cur.execute("select generate_series(1, 10)")
            a = cur.fetchmany(3)
        with c.cursor("held", withhold=True) as cur:
            cur.execute("select generate_series(1, 5)")
            c.commit()
            b = cur.fetchall()
        return [a, b]


@rolled_back
def copy_roundtrip(c: psycopg.Connection[Any]) -> Any:
    c.execute("create temp table t (a int, b text)")
    with c.cursor().copy("copy t from stdin") as copy:
        for i in range(100):
            copy.write_row((i, f"r{i}"))
    with c.cursor().copy("copy (select * from t order by a) to stdout") as copy:
        rows = list(copy.rows())
    return [len(rows), rows[0], rows[-1]]


@behaviour
def copy_error(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        c.execute("create temp table t (a int)")
        try:
            with c.cursor().copy("copy t from stdin") as copy:
                copy.write_row(("notanint",))
        except psycopg.Error as e:
            out: list[Any] = [err(e)]
        out.append(recovered(c))
        return out


@behaviour
def notify_self(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("listen chan")
        c.execute("notify chan, 'hello'")
        gen = c.notifies(timeout=2, stop_after=1)
        n = list(gen)
        c.execute("unlisten *")
        return [(x.channel, x.payload) for x in n]


@behaviour
def notices(dsn: str) -> Any:
    got: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as c:
        c.add_notice_handler(lambda d: got.append((d.severity, d.message_primary)))
        c.execute("do $$begin raise notice 'hi %', 1; end$$")
    return got


@behaviour
def error_diag(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        try:
            c.execute("select * from nonexistent_table")
        except psycopg.Error as e:
            d = e.diag
            out: list[Any] = [d.sqlstate, d.severity, d.message_primary, d.statement_position]
        try:
            c.execute("select 1")
        except psycopg.Error as e:
            out.append(err(e))
        out.append(recovered(c))
        return out


@rolled_back
def savepoints(c: psycopg.Connection[Any]) -> Any:
    c.execute("create temp table s (x int)")
    with c.transaction():
        c.execute("insert into s values (1)")
        try:
            with c.transaction():
                c.execute("insert into s values (2)")
                raise RuntimeError
        except RuntimeError:
            pass
    return c.execute("select array_agg(x) from s").fetchone()


@behaviour
def autocommit_toggle(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        c.execute("select 1")
        c.rollback()
        c.autocommit = True
        c.execute("create temp table ac (x int)")
        c.execute("insert into ac values (1)")
        c.autocommit = False
        r = c.execute("select count(*) from ac").fetchone()
        c.rollback()
        return [r, c.info.transaction_status.name]


@rolled_back
def executemany_returning(c: psycopg.Connection[Any]) -> Any:
    c.execute("create temp table em (x int)")
    cur = c.cursor()
    cur.executemany("insert into em values (%s) returning x * 2", [(i,) for i in range(20)], returning=True)
    out: list[Any] = []
    while True:
        out.append(cur.fetchone())
        if not cur.nextset():
            break
    return out


@behaviour
def prepared_many(dsn: str) -> Any:
    with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as c:
        c.prepared_max = 5
        out: list[Any] = []
        for round_ in range(3):
            for k in range(8):
                row: Any = c.execute(f"select %s::int + {k}", [round_]).fetchone()
                out.append(row[0])
        out.append(c.execute("deallocate all").statusmessage)
        out.append(c.execute("select %s::int", [9]).fetchone())
        return out


@behaviour
def prepared_after_alter(dsn: str) -> Any:
    with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as c:
        c.execute("drop table if exists alt")
        c.execute("create table alt (a int)")
        c.execute("insert into alt values (1)")
        a: Any = c.execute("select * from alt where a = %s", [1]).fetchall()
        c.execute("alter table alt add column b int default 2")
        b: Any
        try:
            b = c.execute("select * from alt where a = %s", [1]).fetchall()
        except psycopg.Error as e:
            b = err(e)
        c2 = c.execute("select * from alt where a = %s", [1]).fetchall()
        c.execute("drop table alt")
        return [a, b, c2]


@behaviour
def types_roundtrip(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        vals = [
            datetime.date(2020, 1, 2),
            datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
            [1, 2, 3],
            {"a": [1, None]},
            b"\x00\xff",
            1.5,
            None,
        ]
        r = c.execute("select %s, %s, %s, %s::jsonb, %s, %s, %s", [*vals[:3], Jsonb(vals[3]), *vals[4:]]).fetchone()
        return repr(r)


@behaviour
def binary_cursor(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        cur = c.cursor(binary=True)
        return repr(cur.execute("select %s::int, %s::text, now()::date = current_date", [1, "x"]).fetchone())


@behaviour
def cancel(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        t = threading.Timer(1, c.cancel_safe)
        t.start()
        try:
            c.execute("select pg_sleep(20)")
            r = "no error"
        except psycopg.Error as e:
            r = err(e)
        t.join()
        return [r, recovered(c)]


@behaviour
def idle_session_settings_follow(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("set datestyle = 'German'")
        c.execute("set timezone = 'Asia/Tokyo'")
        out: list[Any] = [c.info.parameter_status("DateStyle"), c.info.parameter_status("TimeZone")]
        for _ in range(3):
            out.append(c.execute("select '2024-03-04'::date::text, current_setting('timezone')").fetchone())
        return out


@behaviour
def transaction_status_after_error(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        try:
            c.execute("select 1/0")
        except psycopg.Error:
            pass
        s1 = c.info.transaction_status.name
        c.rollback()
        return [s1, c.info.transaction_status.name]


@behaviour
def large_result(dsn: str) -> Any:
    with psycopg.connect(dsn) as c:
        rows = c.execute("select g, repeat('x', 1000) from generate_series(1, 5000) g").fetchall()
        return [len(rows), rows[-1][0]]


@behaviour
def deallocate_prepare_name(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.pgconn.prepare(b"mine", b"select 42")
        a = c.pgconn.exec_prepared(b"mine", None).get_value(0, 0)
        c.execute("deallocate mine")
        r = c.pgconn.exec_prepared(b"mine", None)
        return [a, r.error_field(pq.DiagnosticField.SQLSTATE)]


@behaviour
def describe_prepared(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.pgconn.prepare(b"d1", b"select $1::int as x, $2::text as y")
        r = c.pgconn.describe_prepared(b"d1")
        return [r.nparams, [r.param_type(i) for i in range(r.nparams)], [r.fname(i) for i in range(r.nfields)]]


def _node(case: str) -> Behaviour:
    def run(dsn: str, port: int) -> Any:
        proc = subprocess.run(["node", str(NODE), str(port), case], capture_output=True, text=True, timeout=60)
        return proc.stdout.strip() or proc.stderr.strip()[-200:]

    return run


for _case in ("quick", "fatal", "options"):
    BEHAVIOURS[f"node_{_case}"] = _node(_case)


# -- running ---------------------------------------------------------------------------------------


def start_pooler(
    pythonpath: Path | None, pg: TempPostgres, mode: str, size: int, tmp: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "auth_type": "trust",
        "pool_mode": mode,
        "default_pool_size": size,
        "max_client_conn": 100,
        "log_connections": False,
        "log_disconnections": False,
        "databases": {"app": {"host": pg.host, "port": pg.port}},
    }
    config = tmp / f"{mode}.yaml"
    config.write_text(yaml.safe_dump(settings))
    log_path = tmp / f"{mode}.log"
    if pythonpath is None:
        cmd = [sys.executable, "-P", "-m", "pgfleet.pooler", "--config", str(config)]
    else:
        # That directory's pgfleet.pooler first; the rest from this checkout.
        boot = f"import runpy, sys; sys.path.insert(0, {str(pythonpath)!r}); runpy.run_module('pgfleet.pooler', run_name='__main__')"
        cmd = [sys.executable, "-P", "-c", boot, "--config", str(config)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 30
    while "ready on" not in log_path.read_text():
        if time.monotonic() > end or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(log_path.read_text())
        time.sleep(0.05)
    return proc, port


def run_one(fn: Behaviour, port: int) -> Any:
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=app"
    try:
        result = fn(dsn, port)
    except Exception as exc:
        result = f"EXC {err(exc)} {str(exc)[:120]}"
    return json.loads(json.dumps(result, default=repr))  # tuples and lists alike


def compare(pythonpath: Path | None) -> dict[str, list[str]]:
    """Run every behaviour three ways; the names that differ from direct, per mode."""
    with tempfile.TemporaryDirectory(prefix="pgfleet-behaviours-") as tmpdir:
        tmp = Path(tmpdir)
        pg = TempPostgres(max_connections=100)
        pg.start()
        procs = []
        try:
            pg.sql("CREATE DATABASE app")
            targets = {"direct": pg.port}
            for mode, size in (("session", 2), ("transaction", 4)):
                proc, port = start_pooler(pythonpath, pg, mode, size, tmp)
                procs.append(proc)
                targets[mode] = port
            differ: dict[str, list[str]] = {"session": [], "transaction": []}
            for name, fn in BEHAVIOURS.items():
                results = {target: run_one(fn, port) for target, port in targets.items()}
                for mode, names in differ.items():
                    if results[mode] != results["direct"]:
                        names.append(name)
                        print(f"differs  {mode:11} {name}: direct {results['direct']!r:.160}")
                        print(f"{'':21}{' ' * len(name)}  {mode} {results[mode]!r:.160}")
            return differ
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            pg.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", help="run the pooler as of this git revision of the checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgfleet-pooler-") as src:
        pythonpath = None
        if args.commit:
            # The pooler package alone, as of that commit; the rest comes from this checkout.
            pythonpath = Path(src)
            (pythonpath / "pgfleet").mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.commit, "pooler"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(pythonpath / "pgfleet")], input=archive.stdout, check=True)
        differ = compare(pythonpath)
    print(
        f"behaviours: {len(BEHAVIOURS)}; differ from direct: "
        f"session {len(differ['session'])}, transaction {len(differ['transaction'])}"
    )


if __name__ == "__main__":
    main()
