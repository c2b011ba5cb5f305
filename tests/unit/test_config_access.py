"""``liftoff.config.access``: keys from the configuration, the environment and files, never shown; bind hosts that
refuse to expose the management and internal ports without their keys; URLs without their passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from liftoff.config.access import is_loopback, redact_url
from liftoff.config.loader import ConfigError, load_config
from liftoff.config.models import AppConfig

KEY = "k" * 16
OTHER = "o" * 24


def server(env: dict[str, str], tmp_path: Path, text: str | None = None) -> AppConfig:
    path = None
    if text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(text)
    return load_config(config_path=str(path) if path else None, env=env).server


def test_keys_come_from_the_environment_comma_separated(tmp_path: Path) -> None:
    config = server({"TAKEOFF_API_KEYS": f" {KEY} , {OTHER},", "TAKEOFF_MANAGEMENT_API_KEYS": OTHER}, tmp_path)
    assert config.api_keys == (KEY, OTHER)
    assert config.management_api_keys == (OTHER,)
    assert config.reader_secret is None


def test_keys_come_from_the_manifest_as_a_list(tmp_path: Path) -> None:
    text = f"takeoff:\n  server_config:\n    api_keys: [{KEY}, {OTHER}]\n    reader_secret: {OTHER}\n"
    config = server({}, tmp_path, text)
    assert config.api_keys == (KEY, OTHER)
    assert config.reader_secret == OTHER


def test_key_files_add_one_key_per_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# inference keys\n{OTHER}\n\n{KEY}\n")
    secret = tmp_path / "secret"
    secret.write_text(f"{OTHER}\n")
    env = {"TAKEOFF_API_KEYS": KEY, "TAKEOFF_API_KEYS_FILE": str(keys), "TAKEOFF_READER_SECRET_FILE": str(secret)}
    config = server(env, tmp_path)
    assert config.api_keys == (KEY, OTHER, KEY)
    assert config.reader_secret == OTHER


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TAKEOFF_API_KEYS_FILE": "/no/such/file"}, "api_keys_file: cannot read /no/such/file"),
        ({"TAKEOFF_READER_SECRET_FILE": "EMPTY"}, "holds no key"),
    ],
)
def test_a_key_file_that_cannot_be_used_stops_the_start(tmp_path: Path, env: dict[str, str], words: str) -> None:
    (tmp_path / "empty").write_text("\n# nothing\n")
    env = {key: value.replace("EMPTY", str(tmp_path / "empty")) for key, value in env.items()}
    with pytest.raises(ConfigError, match=words):
        server(env, tmp_path)


@pytest.mark.parametrize("variable", ["TAKEOFF_API_KEYS", "TAKEOFF_MANAGEMENT_API_KEYS", "TAKEOFF_READER_SECRET"])
def test_a_short_key_is_refused_without_being_shown(tmp_path: Path, variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        server({variable: "short-secret"}, tmp_path)
    assert "at least 16 characters" in str(info.value)
    assert "short-secret" not in str(info.value)
    assert "got a secret" in str(info.value)


def test_keys_are_not_in_the_repr_or_the_status_view() -> None:
    config = AppConfig(api_keys=KEY, management_api_keys=OTHER, reader_secret=OTHER)
    for text in (repr(config), str(config), str(config.status_view())):
        assert KEY not in text
        assert OTHER not in text


def test_defaults_keep_management_and_internal_on_loopback() -> None:
    config = AppConfig()
    assert (config.host, config.management_host, config.internal_host) == ("0.0.0.0", "127.0.0.1", "127.0.0.1")
    assert config.bind_host("port") == config.bind_host("openai_port") == "0.0.0.0"
    assert config.bind_host("management_port") == config.bind_host("internal_port") == "127.0.0.1"
    assert config.exposure() == ([], [])


def test_management_or_internal_beyond_loopback_without_keys_is_refused_naming_the_setting() -> None:
    errors, _ = AppConfig(management_host="0.0.0.0", internal_host="10.1.2.3").exposure()
    assert len(errors) == 2
    assert "management_host is '0.0.0.0'" in errors[0]
    assert "management_api_keys" in errors[0]
    assert "allow_insecure_management" in errors[0]
    assert "internal_host is '10.1.2.3'" in errors[1]
    assert "reader_secret" in errors[1]


def test_keys_or_the_insecure_switches_let_them_listen_beyond_loopback() -> None:
    keyed = AppConfig(management_host="0.0.0.0", internal_host="::", management_api_keys=KEY, reader_secret=OTHER)
    assert keyed.exposure() == ([], [])
    errors, warnings = AppConfig(management_host="0.0.0.0", internal_host="0.0.0.0", allow_insecure_management=True,
                                 allow_insecure_internal=True).exposure()  # fmt: skip
    assert errors == []
    assert len(warnings) == 2
    assert all("is true" in warning for warning in warnings)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("api.localhost", True), ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False),
     ("192.168.1.20", False), ("no-such-host.invalid", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://user:pw@redis:6380/1?ssl_ca_certs=/ca.pem", "rediss://user:***@redis:6380/1?ssl_ca_certs=/ca.pem"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_secrets_have_no_command_line_flags() -> None:
    from liftoff.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "--management-host" in help_text
    assert "--api-keys-file" in help_text
    assert "--allowed-hosts" in help_text  # a comma-separated list
    for flag in ("--api-keys ", "--management-api-keys ", "--reader-secret "):
        assert flag not in help_text


def test_a_misspelt_secret_is_not_shown_either(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        server({}, tmp_path, "takeoff:\n  server_config:\n    api_key: my-precious-secret-value\n")
    assert "server_config.api_key: Extra inputs are not permitted (got a secret" in str(info.value)
    assert "my-precious" not in str(info.value)
