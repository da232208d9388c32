"""The PgBouncer drop-in: pgbouncer.ini read into pgfleet's config, and run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pgfleet.devtools.tempdb import TempPostgres, free_port
from pgfleet.devtools.testing import client_env, run_cmd
from pgfleet.pooler.config import ConfigError, PoolMode, SslMode, load_config, parse_config
from pgfleet.pooler.ini import ini_to_dict, parse_connstring, parse_duration

from .conftest import USERLIST, PoolerProcess

SAMPLE = """\
;; A PgBouncer config as teams keep it.
[databases]
app = host=db.internal port=5433 dbname=appdb pool_size=3 reserve_pool=2
reports = host=replica1,replica2 dbname=app user=reporter password='p a''ss' pool_mode=session
* = host=db.internal port=5433 auth_user=pgbouncer

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6543
auth_type = scram-sha-256
auth_file = userlist.txt
admin_users = alice, bob
stats_users = grafana
pool_mode = transaction
default_pool_size = 4
max_client_conn = 500
server_idle_timeout = 30
query_wait_timeout = 2min
server_reset_query_always = 1
log_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
so_reuseport = 1
tcp_keepalive = 1
server_tls_sslmode = verify-full
server_tls_ca_file = /etc/tls/ca.pem
client_tls13_ciphers = TLS_AES_128_GCM_SHA256

[users]
md5user = pool_mode=session max_user_connections=3
"""


def test_sample_ini_maps_onto_the_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pgbouncer.ini"
    path.write_text(SAMPLE)
    (tmp_path / "userlist.txt").write_text(USERLIST)
    with caplog.at_level(logging.WARNING, logger="pgfleet.ini"):
        config = load_config(path)
    assert (config.listen_addr, config.listen_port) == ("0.0.0.0", 6543)
    assert config.auth_type.value == "scram-sha-256"
    assert config.auth_file == str(tmp_path / "userlist.txt")
    assert config.admin_users == ["alice", "bob"] and config.stats_users == ["grafana"]
    assert config.pool_mode is PoolMode.TRANSACTION
    assert (config.default_pool_size, config.max_client_conn) == (4, 500)
    assert config.server_idle_timeout == 30 and config.query_wait_timeout == 120
    assert config.server_reset_query_always is True and config.log_connections is False
    assert config.ignore_startup_parameters == ["extra_float_digits", "options"]
    app = config.databases["app"]
    assert (app.host, app.port, app.dbname, app.pool_size, app.reserve_pool_size) == (
        "db.internal",
        5433,
        "appdb",
        3,
        2,
    )
    reports = config.databases["reports"]
    assert (reports.host, reports.user, reports.password) == ("replica1", "reporter", "p a'ss")
    assert reports.pool_mode is PoolMode.SESSION
    assert config.database("anything") == config.databases["*"]
    assert (config.server_tls_sslmode, config.server_tls_ca_file) == (SslMode.VERIFY_FULL, "/etc/tls/ca.pem")
    user = config.users["md5user"]
    assert (user.pool_mode, user.max_user_connections) == (PoolMode.SESSION, 3)
    # Each setting pgfleet does not act on is named once.
    warned = caplog.text
    for key in ("logfile", "pidfile", "so_reuseport", "tcp_keepalive", "client_tls13_ciphers"):
        assert f"{key} ignored" in warned, key
    assert "auth_user ignored" in warned
    assert "several hosts given; pgfleet connects to replica1 only" in warned


def test_unknown_and_unsupported_settings_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'pool_siez'"):
        ini_to_dict("[pgbouncer]\npool_siez = 3\n", "x.ini")
    with pytest.raises(ConfigError, match="auth_type 'ldap' is not supported"):
        ini_to_dict("[pgbouncer]\nauth_type = ldap\n", "x.ini")
    with pytest.raises(ConfigError, match=r"\[databases\] app: unknown setting 'hots'"):
        ini_to_dict("[databases]\napp = hots=x\n", "x.ini")
    with pytest.raises(ConfigError, match=r"x\.ini:2: server_lifetime: not a duration"):
        ini_to_dict("[pgbouncer]\nserver_lifetime = soon\n", "x.ini")
    with pytest.raises(ConfigError, match="outside a known section"):
        ini_to_dict("listen_port = 1\n", "x.ini")
    # Values the model rejects name the key too.
    with pytest.raises(ConfigError, match="default_pool_size"):
        parse_config(ini_to_dict("[pgbouncer]\ndefault_pool_size = lots\n"), "x.ini")


def test_value_syntax() -> None:
    assert parse_duration("600", "k", "w") == 600
    assert parse_duration("250ms", "k", "w") == 0.25
    assert parse_duration("1.5", "k", "w") == 1.5
    assert parse_duration("2h", "k", "w") == 7200
    assert parse_connstring("host=a  port=1 password='x\\'y' dbname=''", "w") == {
        "host": "a",
        "port": "1",
        "password": "x'y",
        "dbname": "",
    }
    data = ini_to_dict('[databases]\n"Odd Name" = dbname=odd\n[pgbouncer]\nunix_socket_dir =\n')
    assert data == {"databases": {"Odd Name": {"dbname": "odd"}}, "unix_socket_dir": None}


def test_include_directive(tmp_path: Path) -> None:
    (tmp_path / "dbs.ini").write_text("[databases]\napp = dbname=app\n")
    main = tmp_path / "pgbouncer.ini"
    main.write_text("[pgbouncer]\nlisten_port = 7000\n%include dbs.ini\n")
    assert ini_to_dict(main.read_text(), str(main)) == {"listen_port": "7000", "databases": {"app": {"dbname": "app"}}}


async def test_pgbouncer_ini_runs(pg: TempPostgres, tmp_path: Path) -> None:
    """`pgfleet-pooler --config pgbouncer.ini` with databases, users and pool settings, end to end."""
    port = free_port()
    (tmp_path / "userlist.txt").write_text(USERLIST)
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"""\
[databases]
app = host={pg.host} port={pg.port} dbname=app pool_size=2
aliased = host={pg.host} port={pg.port} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = md5
auth_file = userlist.txt
admin_users = md5user
default_pool_size = 7
server_idle_timeout = 60
logfile = pgbouncer.log
pidfile = pgbouncer.pid
[users]
scramuser = max_user_connections=4
"""
    )
    code, out, err = await run_cmd(".venv/bin/pgfleet-pooler", "--check-config", str(ini))
    assert code == 0 and "OK" in out, err
    proc = PoolerProcess(ini, {"listen_port": port})
    try:
        proc.wait_ready()
        assert "logfile ignored" in proc.log() and "pidfile ignored" in proc.log()
        psql = ["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port)]
        code, out, err = await run_cmd(
            *psql, "-U", "md5user", "aliased", "-c", "SELECT current_database()", env=client_env("md5pass")
        )
        assert code == 0, err
        assert out.strip() == "postgres"
        code, out, err = await run_cmd(
            *psql, "-F", ",", "-U", "md5user", "pgbouncer", "-c", "SHOW DATABASES", env=client_env("md5pass")
        )
        assert code == 0, err
        rows = {line.split(",")[0]: line.split(",") for line in out.splitlines()}
        assert rows["app"][5] == "2" and rows["aliased"][5] == "7"  # pool_size
        code, out, err = await run_cmd(
            *psql, "-F", ",", "-U", "md5user", "pgbouncer", "-c", "SHOW USERS", env=client_env("md5pass")
        )
        assert code == 0, err
        users = {line.split(",")[0]: line.split(",") for line in out.splitlines()}
        assert users["scramuser"][4] == "4"  # max_user_connections
    finally:
        proc.stop()


def test_auth_query_settings_are_read() -> None:
    data = ini_to_dict(
        "[pgbouncer]\nauth_user = pgbouncer\nauth_dbname = postgres\n"
        "auth_query = SELECT usename, passwd FROM user_search($1)\n"
    )
    config = parse_config(data)
    assert (config.auth_user, config.auth_dbname) == ("pgbouncer", "postgres")
    assert config.auth_query == "SELECT usename, passwd FROM user_search($1)"
