"""auth_type = hba: the method per connection from auth_hba_file, with real clients."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme
from pgfleet.devtools.testing import client_env, run_cmd
from pgfleet.pooler import cli
from pgfleet.pooler.config import ConfigError
from pgfleet.pooler.hba import method_for, parse_hba

from .conftest import StartPooler

RULES = """
# type    database  user       address        method
hostssl   all       md5user    127.0.0.1/32   cert
host      all       md5user    127.0.0.1/32   md5
host      all       scramuser  127.0.0.1 255.255.255.255  scram-sha-256
host      all       plainuser  all            reject
host      sameuser  all        127.0.0.1/32   password
local     all       all                       trust
"""


def test_first_matching_rule_decides() -> None:
    rules = parse_hba(RULES, "hba.conf")
    assert method_for(rules, "app", "md5user", "127.0.0.1", tls=True) == "cert"
    assert method_for(rules, "app", "md5user", "127.0.0.1", tls=False) == "md5"
    assert method_for(rules, "app", "md5user", "10.0.0.1", tls=False) is None
    assert method_for(rules, "app", "scramuser", "127.0.0.1", tls=False) == "scram-sha-256"
    assert method_for(rules, "app", "plainuser", "::1", tls=False) == "reject"
    assert method_for(rules, "postgres", "postgres", "127.0.0.1", tls=False) == "password"
    assert method_for(rules, "app", "postgres", "127.0.0.1", tls=False) is None
    assert method_for(rules, "app", "anyone", "unix", tls=False) == "trust"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("host all all 127.0.0.1/32 ldap", "method 'ldap' is not supported"),
        ("host all all 127.0.0.1/32 md5 clientcert=verify-full", "options are not supported"),
        ("host @dbs all 127.0.0.1/32 md5", "@file and +group lists are not supported"),
        ("host all all nowhere md5", "not an address"),
        ("hostgssenc all all all md5", "unknown connection type 'hostgssenc'"),
        ("host all all", "too few fields"),
    ],
)
def test_lines_pgfleet_cannot_honour_are_errors_naming_the_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"hba.conf:2: .*{re.escape(message)}"):
        parse_hba("local all all trust\n" + line + "\n", "hba.conf")


async def psql(port: int, conninfo: str, user: str, password: str = "") -> tuple[int, str, str]:
    return await run_cmd(
        "psql", "-X", "-A", "-t", "-d", f"host=127.0.0.1 port={port} user={user} dbname=app {conninfo}",
        "-c", "SELECT current_user", env=client_env(password),
    )  # fmt: skip


async def test_methods_by_rule_with_psql(tmp_path: Path, start_pooler: StartPooler) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = {
        "ca.crt": ca.cert_pem.bytes(),
        "pooler.crt": b"".join(pem.bytes() for pem in server.cert_chain_pems),
        "pooler.key": server.private_key_pem.bytes(),
    }
    for name, cn in (("md5user", "md5user"), ("other", "scramuser")):
        cert = ca.issue_cert(cn, common_name=cn)
        files[f"{name}.crt"] = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
        files[f"{name}.key"] = cert.private_key_pem.bytes()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o600)
    (tmp_path / "hba.conf").write_text(RULES)
    pooler = await start_pooler(
        auth_type="hba", auth_hba_file=str(tmp_path / "hba.conf"), unix_socket_dir=str(tmp_path),
        client_tls_sslmode="prefer", client_tls_cert_file=str(tmp_path / "pooler.crt"),
        client_tls_key_file=str(tmp_path / "pooler.key"), client_tls_ca_file=str(tmp_path / "ca.crt"),
    )  # fmt: skip
    port = pooler.port
    # md5 in the clear; over TLS the certificate names the user, no password asked.
    assert (await psql(port, "sslmode=disable", "md5user", "md5pass"))[:2] == (0, "md5user\n")
    cert = f"sslmode=require sslcert={tmp_path / 'md5user.crt'} sslkey={tmp_path / 'md5user.key'}"
    code, out, err = await psql(port, cert, "md5user")
    assert (code, out.strip()) == (0, "md5user"), err
    wrong = f"sslmode=require sslcert={tmp_path / 'other.crt'} sslkey={tmp_path / 'other.key'}"
    code, _, err = await psql(port, wrong, "md5user")
    assert code != 0 and 'certificate authentication failed for user "md5user"' in err, err
    code, out, err = await psql(port, "sslmode=disable", "scramuser", "scrampass")
    assert (code, out.strip()) == (0, "scramuser"), err
    code, _, err = await psql(port, "sslmode=disable", "plainuser", "plainpass")
    assert code != 0 and 'auth_hba_file rejects connection for host "127.0.0.1", user "plainuser"' in err, err
    code, _, err = await psql(port, "sslmode=disable", "postgres")
    assert code != 0 and 'no auth_hba_file entry for host "127.0.0.1", user "postgres", database "app"' in err, err
    # The unix socket: `local ... trust`.
    code, out, err = await psql(port, f"host={tmp_path}", "postgres")
    assert (code, out.strip()) == (0, "postgres"), err


def test_check_config_reads_the_hba_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "hba.conf").write_text("host all all 127.0.0.1/32 md5\nhost all all all ident\n")
    path = tmp_path / "pooler.yaml"
    path.write_text("auth_type: hba\nauth_hba_file: hba.conf\n")  # relative to the config file
    assert cli.main(["--check-config", str(path)]) == 2
    assert f"{tmp_path / 'hba.conf'}:2: method 'ident' is not supported" in capsys.readouterr().err
    path.write_text("auth_type: hba\n")
    assert cli.main(["--check-config", str(path)]) == 2
    assert "auth_type hba needs auth_hba_file" in capsys.readouterr().err
