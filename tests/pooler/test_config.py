"""The config file: PgBouncer's names, clear errors that name the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pgfleet.pooler.auth import md5_secret
from pgfleet.pooler.config import ConfigError, PoolMode, load_config, parse_config
from pgfleet.pooler.userlist import parse_userlist


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgfleet.pooler", "--check-config", str(path)], capture_output=True, text=True
    )


def test_valid_config_passes_check(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"app" "secret"\n')
    path = tmp_path / "pooler.yaml"
    path.write_text(
        "listen_port: 6432\nauth_file: users.txt\npool_mode: transaction\n"
        "databases:\n  app: {host: db.internal, port: 5432, pool_size: 7}\n  '*': {host: fallback}\n"
    )
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    config = load_config(path)
    assert config.auth_file == str(tmp_path / "users.txt")
    assert config.database("app") is not None and config.database("app").pool_size == 7  # type: ignore[union-attr]
    assert config.database("other") is config.databases["*"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("listen_prot: 6432\n", "listen_prot: unknown setting"),
        ("listen_port: 70000\n", "listen_port"),
        ("pool_mode: sometimes\n", "pool_mode"),
        ("default_pool_size: -1\n", "default_pool_size"),
        ("databases:\n  app: {hots: x}\n", "databases.app.hots: unknown setting"),
        ("auth_type: md5\n", "needs auth_file or auth_user"),
        ("[not yaml\n", "not valid YAML"),
        ("- a list\n", "mapping"),
    ],
)
def test_invalid_config_is_refused_with_the_bad_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        ("auth_type: trust\n" if "auth_type" not in text and "[" not in text and "-" not in text[:1] else "") + text
    )
    result = check_config(path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_running_with_an_invalid_config_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("auth_type: trust\nmax_client_con: 10\n")
    result = subprocess.run(
        [sys.executable, "-m", "pgfleet.pooler", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "max_client_con: unknown setting" in result.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_pgbouncer_style_lists_are_accepted() -> None:
    config = parse_config(
        {"auth_type": "trust", "admin_users": "alice, bob", "ignore_startup_parameters": "extra_float_digits"}
    )
    assert config.admin_users == ["alice", "bob"]
    assert config.ignore_startup_parameters == ["extra_float_digits"]
    assert config.pool_mode is PoolMode.TRANSACTION


def test_userlist_format() -> None:
    text = '; comment\n"alice" "pa""ss"\n\n"bob" "md5abc"\n"carol" "SCRAM-SHA-256$4096:c2FsdA==$a:b"\n'
    assert parse_userlist(text) == {"alice": 'pa"ss', "bob": "md5abc", "carol": "SCRAM-SHA-256$4096:c2FsdA==$a:b"}
    with pytest.raises(ConfigError, match=":1: unterminated"):
        parse_userlist('"alice" "unterminated\n')


def test_md5_secret_matches_postgresql() -> None:
    # SELECT 'md5' || md5('secret' || 'alice')
    assert md5_secret("alice", "secret") == "md5" + __import__("hashlib").md5(b"secretalice").hexdigest()
