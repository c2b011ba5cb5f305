"""``liftoff.config.models``: ``ReaderConfig`` validation rules and ``AppConfig`` views."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from liftoff.config.models import STATUS_CONFIG_KEYS, AppConfig, ReaderConfig


def reader(**fields: Any) -> ReaderConfig:
    return ReaderConfig.model_validate({"model_name": "echo", "device": "cpu", **fields})


# ---- consumer groups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ("solo", ["solo"]),
        (["x", "y"], ["x", "y"]),
        (["x", " ", ""], ["x"]),
        ("", ["primary"]),
        (" , ", ["primary"]),
        ([], ["primary"]),
        (None, ["primary"]),
    ],
)
def test_consumer_group_parsing(value: Any, expected: list[str]) -> None:
    assert reader(consumer_group=value).consumer_group == expected


def test_consumer_group_defaults_to_primary() -> None:
    assert reader().consumer_group == ["primary"]


def test_consumer_groups_alias() -> None:
    assert reader(consumer_groups="a,b").consumer_group == ["a", "b"]


def test_max_seq_length_alias() -> None:
    assert reader(max_seq_length=128).max_sequence_length == 128
    assert reader(max_sequence_length=256).max_sequence_length == 256


# ---- model_name and device --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "api"])
def test_valid_devices(device: str) -> None:
    assert reader(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "CUDA", "", "tpu"])
def test_invalid_device(device: str) -> None:
    with pytest.raises(ValidationError, match="device"):
        reader(device=device)


@pytest.mark.parametrize("name", ["", "   ", "\t"])
def test_empty_model_name_is_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="model_name"):
        reader(model_name=name)


def test_model_name_is_stripped() -> None:
    assert reader(model_name="  echo  ").model_name == "echo"


def test_model_name_and_device_are_required() -> None:
    with pytest.raises(ValidationError, match="device"):
        ReaderConfig.model_validate({"model_name": "echo"})
    with pytest.raises(ValidationError, match="model_name"):
        ReaderConfig.model_validate({"device": "cpu"})


def test_unknown_reader_option_is_rejected() -> None:
    with pytest.raises(ValidationError, match="max_batch"):
        reader(max_batch=3)


# ---- tensor_parallel and cuda_visible_devices --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"tensor_parallel": 1},
        {"tensor_parallel": 1, "device": "cpu"},
        {"tensor_parallel": 2, "device": "cuda"},
        {"tensor_parallel": 4, "device": "cuda"},
        {"tensor_parallel": 2, "device": "cuda", "cuda_visible_devices": "0,1"},
        {"tensor_parallel": 2, "device": "cuda", "cuda_visible_devices": "0,1,2"},
    ],
)
def test_valid_tensor_parallel(fields: dict[str, Any]) -> None:
    assert reader(**fields).tensor_parallel == fields["tensor_parallel"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tensor_parallel": 2, "device": "cpu"}, "needs device 'cuda'"),
        ({"tensor_parallel": 3, "device": "cuda"}, "1 or an even number, not 3"),
        ({"tensor_parallel": 4, "device": "cuda", "cuda_visible_devices": "0,1"}, "more than the 2 GPUs"),
        ({"tensor_parallel": 0, "device": "cuda"}, "tensor_parallel"),
    ],
)
def test_invalid_tensor_parallel(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        reader(**fields)


@pytest.mark.parametrize(("value", "expected"), [("0", "0"), ("0,1", "0,1"), ("0, 1, 3", "0,1,3"), ("12", "12")])
def test_valid_cuda_visible_devices(value: str, expected: str) -> None:
    assert reader(device="cuda", cuda_visible_devices=value).cuda_visible_devices == expected


@pytest.mark.parametrize("value", ["", "a", "0;1", "0,", ",1", "0,,1", "-1", "GPU0"])
def test_invalid_cuda_visible_devices(value: str) -> None:
    with pytest.raises(ValidationError, match="comma-separated list of GPU numbers"):
        reader(device="cuda", cuda_visible_devices=value)


@pytest.mark.parametrize(
    "fields",
    [{"max_batch_size": 0}, {"max_sequence_length": 0}, {"nvlink_unavailable": 2}, {"batch_duration_millis": -1}],
)
def test_numeric_bounds(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(fields))):
        reader(**fields)


# ---- views ----------------------------------------------------------------------------------------------------------


def test_public_dict_masks_token_and_joins_groups() -> None:
    config = reader(consumer_group="a,b", access_token="secret", max_batch_size=4)
    public = config.public_dict()
    assert public["consumer_group"] == "a,b"
    assert public["access_token"] == "***"
    assert "quant_type" not in public  # nulls dropped
    assert config.manifest_dict()["access_token"] == "secret"
    assert ReaderConfig.model_validate(config.manifest_dict()) == config


def test_api_reader_keys() -> None:
    config = reader(device="api", model_name="gpt-4o-mini", api_base="http://gpu:8000/v1/", api_timeout_s=5,
                    max_concurrency=64, api_headers={"x-api-key": "k"}, access_token_file="/run/key")  # fmt: skip
    assert config.api_base == "http://gpu:8000/v1"
    public = config.public_dict()
    assert public["api_headers"] == {"x-api-key": "***"}  # header values may be keys: never shown
    assert config.manifest_dict()["api_headers"] == {"x-api-key": "k"}
    with pytest.raises(ValidationError, match="http:// or https:// URL"):
        reader(device="api", api_base="gpu:8000")
    with pytest.raises(ValidationError, match="max_concurrency"):
        reader(device="api", max_concurrency=0)


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        reader().device = "cuda"  # type: ignore[misc]


def test_status_view_has_exactly_the_16_takeoff_keys() -> None:
    view = AppConfig().status_view()
    assert len(view) == 16
    assert list(view) == list(STATUS_CONFIG_KEYS)
    assert set(view) == {
        "allow_remote_images",
        "body_size_limit_bytes",
        "echo",
        "enable_metrics",
        "heartbeat_check_interval",
        "internal_port",
        "management_port",
        "max_prompt_string_bytes",
        "max_user_batch_size",
        "openai_port",
        "port",
        "reader_message_timeout_ms",
        "repository_path",
        "reserved_consumers",
        "snowflake_port",
        "vertex_port",
    }
    assert "host" not in view  # Liftoff extensions stay out of Takeoff's view


def test_status_view_reports_current_values() -> None:
    view = AppConfig(port=4000, echo=True, reserved_consumers="a,b").status_view()
    assert view["port"] == 4000
    assert view["echo"] is True
    assert view["reserved_consumers"] == "a,b"


def test_reserved_groups_parsing() -> None:
    assert AppConfig(reserved_consumers=" a, ,b ").reserved_groups() == ["a", "b"]
    assert AppConfig(reserved_consumers="").reserved_groups() == []


def test_port_fields_cover_every_port() -> None:
    fields = AppConfig.port_fields()
    assert fields[0] == "port"
    assert set(fields) == {"port", "management_port", "vertex_port", "openai_port", "snowflake_port",
                           "sagemaker_port", "internal_port"}  # fmt: skip


def test_app_config_rejects_duplicate_ports_and_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="internal_port and port are both 3000"):
        AppConfig(internal_port=3000)
    with pytest.raises(ValidationError, match="nonsense"):
        AppConfig.model_validate({"nonsense": 1})


# ---- restarts -----------------------------------------------------------------------------------------------------


def test_restart_policy_defaults_to_on_failure_and_is_checked() -> None:
    assert reader().restart_policy == "on-failure"
    assert reader(restart_policy="always").restart_policy == "always"
    with pytest.raises(ValidationError, match="restart_policy"):
        reader(restart_policy="sometimes")


def test_restart_limits_have_bounds() -> None:
    assert (AppConfig().reader_max_restarts, AppConfig().reader_restart_window_s) == (5, 600.0)
    with pytest.raises(ValidationError, match="reader_max_restarts"):
        AppConfig(reader_max_restarts=-1)
    with pytest.raises(ValidationError, match="reader_restart_window_s"):
        AppConfig(reader_restart_window_s=0)
