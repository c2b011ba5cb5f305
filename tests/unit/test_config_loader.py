"""``liftoff.config.loader.load_config``: precedence, defaults, env readers, and errors that name field and source."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from liftoff.config import loader
from liftoff.config.loader import ConfigError, env_name, load_config

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

TAKEOFF_DEFAULTS: dict[str, Any] = {
    "port": 3000,
    "management_port": 3001,
    "vertex_port": 3002,
    "openai_port": 3003,
    "snowflake_port": 3004,
    "internal_port": 3005,
    "enable_metrics": True,
    "heartbeat_check_interval": 1,
    "echo": False,
    "body_size_limit_bytes": 2097152,
    "allow_remote_images": False,
    "reader_message_timeout_ms": 500,
    "reserved_consumers": "primary",
    "max_prompt_string_bytes": 150000,
    "max_user_batch_size": 1000,
}


@pytest.fixture(autouse=True)
def _no_container_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never pick up a real ``/code/config.yaml`` of the machine running the tests."""
    monkeypatch.setattr(loader, "CONTAINER_CONFIG_PATH", tmp_path / "no-such-config.yaml")


def write_manifest(tmp_path: Path, server: dict[str, Any] | None = None, readers: Any = None) -> Path:
    """A ``config.yaml`` with a ``takeoff:`` section (JSON is valid YAML)."""
    body: dict[str, Any] = {}
    if server is not None:
        body["server_config"] = server
    if readers is not None:
        body["readers_config"] = readers
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"takeoff": body}), encoding="utf-8")
    return path


def echo(**extra: Any) -> dict[str, Any]:
    return {"model_name": "echo", "device": "cpu", **extra}


# ---- defaults and precedence ------------------------------------------------------------------------------------


def test_every_takeoff_server_key_has_its_default() -> None:
    loaded = load_config(env={})
    for key, value in TAKEOFF_DEFAULTS.items():
        got = getattr(loaded.server, key)
        assert got == value, key
        assert type(got) is type(value), key
    assert loaded.server.repository_path == os.path.join(os.path.expanduser("~"), "artefacts")
    assert loaded.readers == {}
    assert loaded.path is None
    assert loaded.warnings == []


def test_precedence_defaults_then_yaml_then_env_then_flags(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"port": 4000, "management_port": 4001, "vertex_port": 4002}))
    env = {"TAKEOFF_PORT": "5000", "TAKEOFF_MANAGEMENT_PORT": "5001"}
    flags = {"port": 6000, "management_port": None}
    server = load_config(config_path=path, env=env, server_flags=flags).server
    assert server.port == 6000  # flag beats env and yaml
    assert server.management_port == 5001  # env beats yaml; a None flag is "not given"
    assert server.vertex_port == 4002  # yaml beats default
    assert server.openai_port == 3003  # default
    assert load_config(config_path=path, env=env).server.port == 5000
    assert load_config(config_path=path, env={}).server.port == 4000


def test_env_values_are_parsed_to_field_types() -> None:
    env = {"TAKEOFF_ENABLE_METRICS": "false", "TAKEOFF_ECHO": "true", "TAKEOFF_BODY_SIZE_LIMIT_BYTES": "1024"}
    server = load_config(env=env).server
    assert server.enable_metrics is False
    assert server.echo is True
    assert server.body_size_limit_bytes == 1024


def test_empty_env_value_counts_as_unset(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"port": 4000}))
    assert load_config(config_path=path, env={"TAKEOFF_PORT": ""}).server.port == 4000


def test_config_path_comes_from_takeoff_config_path(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, server={"port": 4100})
    loaded = load_config(env={"TAKEOFF_CONFIG_PATH": str(path)})
    assert loaded.server.port == 4100
    assert loaded.path == path


def test_env_name_is_prefixed_upper_case() -> None:
    assert env_name("max_batch_size") == "TAKEOFF_MAX_BATCH_SIZE"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("file:///data/models", "/data/models"), ("/plain/path", "/plain/path"), ("file://relative/dir", "relative/dir")],
)
def test_repository_path_strips_file_scheme(value: str, expected: str) -> None:
    assert load_config(env={"TAKEOFF_REPOSITORY_PATH": value}).server.repository_path == expected


def test_repository_path_expands_home(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"repository_path": "file://~/models"}))
    assert load_config(config_path=path, env={}).server.repository_path == os.path.expanduser("~/models")


# ---- readers from the environment ---------------------------------------------------------------------------------


def test_env_model_name_and_device_make_one_reader() -> None:
    env = {
        "TAKEOFF_MODEL_NAME": "echo",
        "TAKEOFF_DEVICE": "cuda",
        "TAKEOFF_READER_ID": "my-reader",
        "TAKEOFF_CONSUMER_GROUP": "gen,chat",
        "TAKEOFF_MAX_BATCH_SIZE": "4",
    }
    readers = load_config(env=env).readers
    assert list(readers) == ["my-reader"]
    reader = readers["my-reader"]
    assert reader.model_name == "echo"
    assert reader.device == "cuda"
    assert reader.consumer_group == ["gen", "chat"]
    assert reader.max_batch_size == 4


def test_env_reader_defaults_to_cpu_primary_and_uuid_id() -> None:
    readers = load_config(env={"TAKEOFF_MODEL_NAME": "echo"}).readers
    ((reader_id, reader),) = readers.items()
    assert re.fullmatch(UUID, reader_id)
    assert reader.device == "cpu"
    assert reader.consumer_group == ["primary"]


def test_reader_env_values_ignored_without_model_name() -> None:
    assert load_config(env={"TAKEOFF_DEVICE": "cuda", "TAKEOFF_READER_ID": "x"}).readers == {}


def test_reader_flags_make_a_reader_and_beat_env() -> None:
    env = {"TAKEOFF_MODEL_NAME": "from-env", "TAKEOFF_READER_ID": "r"}
    readers = load_config(env=env, reader_flags={"model_name": "echo", "device": None}).readers
    assert readers["r"].model_name == "echo"
    only_flags = load_config(env={"TAKEOFF_READER_ID": "f"}, reader_flags={"model_name": "echo"}).readers
    assert list(only_flags) == ["f"]


def test_add_reader_id_suffix_appends_uuid(tmp_path: Path) -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_READER_ID": "base", "TAKEOFF_ADD_READER_ID_SUFFIX": "true"}
    (reader_id,) = load_config(env=env).readers
    assert re.fullmatch(f"base_{UUID}", reader_id)
    path = str(write_manifest(tmp_path, readers={"r1": echo()}))
    (file_id,) = load_config(config_path=path, env={"TAKEOFF_ADD_READER_ID_SUFFIX": "1"}).readers
    assert re.fullmatch(f"r1_{UUID}", file_id)


def test_add_reader_id_suffix_false_keeps_id() -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_READER_ID": "base", "TAKEOFF_ADD_READER_ID_SUFFIX": "false"}
    assert list(load_config(env=env).readers) == ["base"]


def test_readers_in_yaml_and_env_is_an_error_saying_how_to_fix(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, readers={"r1": echo()}))
    with pytest.raises(ConfigError) as info:
        load_config(config_path=path, env={"TAKEOFF_MODEL_NAME": "echo"})
    message = str(info.value)
    assert "readers_config" in message
    assert "TAKEOFF_MODEL_NAME" in message
    assert "Remove readers_config from the file" in message
    assert "unset TAKEOFF_MODEL_NAME" in message


# ---- readers from yaml ----------------------------------------------------------------------------------------------


def test_yaml_readers_are_loaded_with_their_ids(tmp_path: Path) -> None:
    readers = {"a": echo(consumer_group="x"), "b": echo(device="cuda", max_batch_size=2)}
    loaded = load_config(config_path=str(write_manifest(tmp_path, readers=readers)), env={})
    assert sorted(loaded.readers) == ["a", "b"]
    assert loaded.readers["a"].consumer_group == ["x"]
    assert loaded.readers["b"].max_batch_size == 2


def test_server_max_batch_size_is_default_of_yaml_readers(tmp_path: Path) -> None:
    readers = {"plain": echo(), "own": echo(max_batch_size=2), "null": echo(max_batch_size=None)}
    path = str(write_manifest(tmp_path, readers=readers))
    loaded = load_config(config_path=path, env={"TAKEOFF_MAX_BATCH_SIZE": "16"})
    assert loaded.server.max_batch_size == 16
    assert loaded.readers["plain"].max_batch_size == 16
    assert loaded.readers["null"].max_batch_size == 16
    assert loaded.readers["own"].max_batch_size == 2
    assert load_config(config_path=path, env={}).readers["plain"].max_batch_size is None


def test_server_batch_duration_is_default_of_readers(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"batch_duration_millis": 25}, readers={"r": echo()}))
    assert load_config(config_path=path, env={}).readers["r"].batch_duration_millis == 25


def test_yaml_consumer_groups_alias_and_max_seq_length_alias(tmp_path: Path) -> None:
    readers = {"r": echo(consumer_groups=["a", " b "], max_seq_length=64)}
    reader = load_config(config_path=str(write_manifest(tmp_path, readers=readers)), env={}).readers["r"]
    assert reader.consumer_group == ["a", "b"]
    assert reader.max_sequence_length == 64


def test_legacy_server_keys_give_warnings(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"launch_vertex_server": True, "launch_openai_server": False}))
    loaded = load_config(config_path=path, env={})
    assert len(loaded.warnings) == 2
    assert any("launch_vertex_server" in warning for warning in loaded.warnings)
    assert any("launch_openai_server" in warning for warning in loaded.warnings)
    assert loaded.server.launch_vertex_server is True


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_invalid_env_value_names_field_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"TAKEOFF_PORT": "not-a-number"})
    message = str(info.value)
    assert "server_config.port" in message
    assert "TAKEOFF_PORT" in message
    assert "not-a-number" in message


def test_invalid_yaml_value_names_field_and_file(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, server={"max_user_batch_size": 0})
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(path), env={})
    assert "server_config.max_user_batch_size" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_flag_value_names_command_line() -> None:
    with pytest.raises(ConfigError, match=r"server_config\.port.*command line"):
        load_config(env={}, server_flags={"port": 70000})


def test_unknown_server_key_is_rejected(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, server={"prot": 3000}))
    with pytest.raises(ConfigError, match=r"server_config\.prot"):
        load_config(config_path=path, env={})


def test_invalid_reader_value_names_reader_and_field(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, readers={"r1": echo(max_batch_size=0)})
    with pytest.raises(ConfigError) as info:
        load_config(config_path=str(path), env={})
    assert "readers_config.r1.max_batch_size" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_env_reader_value_names_field_and_environment() -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_DEVICE": "gpu", "TAKEOFF_READER_ID": "r"}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert "readers_config.r.device" in str(info.value)
    assert "environment" in str(info.value)


def test_reader_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, readers={"r1": "echo"}))
    with pytest.raises(ConfigError, match=r"readers_config\.r1 .*must be a mapping"):
        load_config(config_path=path, env={})


def test_readers_config_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = str(write_manifest(tmp_path, readers=[echo()]))
    with pytest.raises(ConfigError, match=r"readers_config .*must be a mapping"):
        load_config(config_path=path, env={})


def test_yaml_without_takeoff_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server_config:\n  port: 3000\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="No takeoff key"):
        load_config(config_path=str(path), env={})


def test_empty_takeoff_section_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("takeoff:\n", encoding="utf-8")
    loaded = load_config(config_path=str(path), env={})
    assert loaded.server.port == 3000
    assert loaded.readers == {}


def test_invalid_yaml_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("takeoff: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_path=str(path), env={})


def test_missing_config_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(config_path=str(tmp_path / "missing.yaml"), env={})


def test_duplicate_ports_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"TAKEOFF_OPENAI_PORT": "3000"})
    assert "openai_port" in str(info.value)
    assert "port" in str(info.value)
    assert "3000" in str(info.value)


def test_port_zero_may_repeat() -> None:
    server = load_config(env={}, server_flags={"port": 0, "management_port": 0}).server
    assert (server.port, server.management_port) == (0, 0)


def test_dict_options_from_env_are_json() -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_READER_ID": "r", "TAKEOFF_BACKEND_OPTIONS": '{"token_delay_ms": 5}'}
    assert load_config(env=env).readers["r"].backend_options == {"token_delay_ms": 5}


def test_dict_options_from_env_that_are_not_json_name_the_variable() -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_BACKEND_OPTIONS": "token_delay_ms=5"}
    with pytest.raises(ConfigError, match="TAKEOFF_BACKEND_OPTIONS must be a JSON object"):
        load_config(env=env)


def test_env_reader_errors_name_the_variable() -> None:
    env = {"TAKEOFF_MODEL_NAME": "echo", "TAKEOFF_DEVICE": "gpu"}
    with pytest.raises(ConfigError, match=r"device.*TAKEOFF_DEVICE"):
        load_config(env=env)


def test_flag_reader_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"max_batch_size.*--max-batch-size"):
        load_config(env={}, reader_flags={"model_name": "echo", "max_batch_size": 0})


def test_vertex_routes_default_to_the_aip_variables() -> None:
    aip = {"AIP_HEALTH_ROUTE": "/health", "AIP_PREDICT_ROUTE": "/v1/endpoints/1:predict"}
    server = load_config(env=aip).server
    assert (server.vertex_health_route, server.vertex_predict_route) == ("/health", "/v1/endpoints/1:predict")
    mine = load_config(env={**aip, "TAKEOFF_VERTEX_PREDICT_ROUTE": "/mine"}).server
    assert (mine.vertex_health_route, mine.vertex_predict_route) == ("/health", "/mine")
    unset = load_config(env={}).server
    assert (unset.vertex_health_route, unset.vertex_predict_route) == (None, None)
    with pytest.raises(ConfigError, match="vertex_health_route"):
        load_config(env={"AIP_HEALTH_ROUTE": "health"})


def test_vertex_port_defaults_to_aip_http_port() -> None:
    assert load_config(env={"AIP_HTTP_PORT": "7070"}).server.vertex_port == 7070
    assert load_config(env={"AIP_HTTP_PORT": "7070", "TAKEOFF_VERTEX_PORT": "7071"}).server.vertex_port == 7071
    vertex = load_config(env={"AIP_HTTP_PORT": "8080"}).server  # Vertex's default port: SageMaker's moves aside
    assert (vertex.vertex_port, vertex.sagemaker_port) == (8080, 0)  # 0: a free port
    assert load_config(env={}).server.sagemaker_port == 8080
    with pytest.raises(ConfigError, match="sagemaker_port and vertex_port are both 8080"):
        load_config(env={"AIP_HTTP_PORT": "8080", "TAKEOFF_SAGEMAKER_PORT": "8080"})  # asked for: a clear error
    moved = load_config(env={"AIP_HTTP_PORT": "8080", "TAKEOFF_SAGEMAKER_PORT": "8081"}).server
    assert (moved.vertex_port, moved.sagemaker_port) == (8080, 8081)


def test_sagemaker_port_is_a_served_port_but_not_in_the_status_view() -> None:
    server = load_config(env={"TAKEOFF_SAGEMAKER_PORT": "9090"}).server
    assert server.sagemaker_port == 9090
    assert "sagemaker_port" in server.port_fields()
    assert "sagemaker_port" not in server.status_view()
    with pytest.raises(ConfigError, match="sagemaker_port and port are both 3000"):
        load_config(env={"TAKEOFF_SAGEMAKER_PORT": "3000"})


# ---- broker -----------------------------------------------------------------------------------------------------


def test_the_broker_is_embedded_unless_a_redis_url_is_given() -> None:
    assert load_config(env={}).server.broker == "embedded"
    assert load_config(env={"TAKEOFF_BROKER": "redis://cache:6380/2"}).server.broker == "redis://cache:6380/2"


def test_takeoffs_redis_host_and_port_select_the_redis_broker() -> None:
    assert load_config(env={"TAKEOFF_REDIS_HOST": "cache"}).server.broker == "redis://cache:6379/0"
    env = {"TAKEOFF_REDIS_HOST": "cache", "TAKEOFF_REDIS_PORT": "7000"}
    assert load_config(env=env).server.broker == "redis://cache:7000/0"
    env["TAKEOFF_BROKER"] = "redis://other:1/0"  # the explicit broker wins
    assert load_config(env=env).server.broker == "redis://other:1/0"


def test_redis_max_memory_comes_from_takeoffs_variable() -> None:
    assert load_config(env={}).server.redis_max_memory == 1_000_000_000
    assert load_config(env={"TAKEOFF_REDIS_MAX_MEMORY": "5000000"}).server.redis_max_memory == 5_000_000


def test_a_broker_that_is_neither_embedded_nor_redis_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server_config\.broker: .*redis://host:6379/0.*from environment"):
        load_config(env={"TAKEOFF_BROKER": "kafka://x"})


def test_a_reader_joins_the_broker_its_flag_or_configuration_names() -> None:
    from liftoff.broker.factory import reader_broker

    assert reader_broker(None, "embedded", None) == "embedded"
    assert reader_broker("redis://a:1/0", "redis://b:2/0", "c") == "redis://a:1/0"
    assert reader_broker(None, "redis://b:2/0", "c") == "redis://b:2/0"
    assert reader_broker(None, "embedded", "cache") == "redis://cache:6379/0"
    with pytest.raises(ValueError, match="redis://host:6379/0"):
        reader_broker("amqp://x", "embedded", None)
