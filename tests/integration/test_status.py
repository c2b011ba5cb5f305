"""The management ``/status`` matches Takeoff's schema field for field; reader groups and masked status."""

from __future__ import annotations

from typing import Any

from tests.helpers import echo_reader

STATUS_CONFIG_TYPES = {
    "allow_remote_images": bool,
    "body_size_limit_bytes": int,
    "echo": bool,
    "enable_metrics": bool,
    "heartbeat_check_interval": int,
    "internal_port": int,
    "management_port": int,
    "max_prompt_string_bytes": int,
    "max_user_batch_size": int,
    "openai_port": int,
    "port": int,
    "reader_message_timeout_ms": int,
    "repository_path": str,
    "reserved_consumers": str,
    "snowflake_port": int,
    "vertex_port": int,
}
READER_INFO_TYPES = {
    "consumer_groups": list,
    "consumer_name": str,
    "device": str,
    "model_name": str,
    "model_type": str,
    "pids": list,
}


def _check_reader_info(info: dict[str, Any]) -> None:
    assert set(info) == set(READER_INFO_TYPES)
    for key, kind in READER_INFO_TYPES.items():
        assert isinstance(info[key], kind), key
    assert all(isinstance(group, str) for group in info["consumer_groups"])
    assert all(isinstance(pid, int) and not isinstance(pid, bool) for pid in info["pids"])


def test_status_schema_field_for_field(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(), "r2": echo_reader("a,b")}).start()
    server.wait_live(2)
    body = server.status()
    assert set(body) == {"config", "status"}
    config = body["config"]
    assert set(config) == set(STATUS_CONFIG_TYPES)
    for key, kind in STATUS_CONFIG_TYPES.items():
        assert type(config[key]) is kind, key
    assert config["reserved_consumers"] == "primary"
    assert config["port"] == server.ports["port"]
    assert config["body_size_limit_bytes"] == 2097152

    status = body["status"]
    assert set(status) == {"dead_readers", "last_heartbeat", "live_readers", "loading_readers", "reserved_consumers"}
    assert status["reserved_consumers"] == ["primary"]
    assert set(status["live_readers"]) == {"r1", "r2"}
    for info in status["live_readers"].values():
        _check_reader_info(info)
        assert len(info["pids"]) == 1
    assert status["live_readers"]["r2"]["consumer_groups"] == ["a", "b"]
    assert status["live_readers"]["r1"]["model_type"] == "CAUSAL"
    assert set(status["last_heartbeat"]) == {"r1", "r2"}
    for beat in status["last_heartbeat"].values():
        assert set(beat) == {"heartbeat_timestamp", "heartbeat_wait_interval"}
        assert type(beat["heartbeat_timestamp"]) is int
        assert type(beat["heartbeat_wait_interval"]) is int
        assert beat["heartbeat_timestamp"] > 1_600_000_000_000  # epoch milliseconds


def test_reserved_consumers_string_and_list(liftoff: Any) -> None:
    server = liftoff(server={"reserved_consumers": "primary, gold"}).start(wait=None)
    body = server.status()
    assert body["config"]["reserved_consumers"] == "primary, gold"
    assert body["status"]["reserved_consumers"] == ["primary", "gold"]


def test_reader_groups_and_masked_status(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader("a"), "r2": echo_reader("a,b")}).start()
    server.wait_live(2)
    groups = server.http.get(server.mgmt + "/reader_groups").json()
    assert sorted(groups) == ["a", "b"]
    assert sorted(entry["reader_id"] for entry in groups["a"]) == ["r1", "r2"]
    assert [entry["reader_id"] for entry in groups["b"]] == ["r2"]
    entry = groups["b"][0]
    assert set(entry) == {"reader_id", "device", "model_name", "model_type", "pids", "ready"}
    assert entry["ready"] is True

    masked = server.http.get(server.base + "/status")
    assert masked.status_code == 200
    body = masked.json()
    assert set(body) == {"live_readers", "dead_readers", "ports"}
    assert body["ports"][0] == server.ports["port"]
    assert set(body["live_readers"]["r2"]) == {"consumer_groups", "device", "model_name", "model_type"}


def test_every_port_answers_healthz(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    for key in server.ports:
        response = server.http.get(server.url(key) + "/healthz")
        assert response.status_code == 200, key
        assert response.json()["live_readers"] == 1


def test_healthz_without_readers_is_503_and_waits(liftoff: Any) -> None:
    server = liftoff().start(wait=None)
    assert server.http.get(server.base + "/healthz").status_code == 503
    assert server.http.get(server.base + "/healthz", params={"state": "loading"}).status_code == 503
    assert server.http.get(server.base + "/healthz", params={"wait": "0.2s"}).status_code == 503
    bad = server.http.get(server.base + "/healthz", params={"wait": "soon"})
    assert bad.status_code == 400
    assert "wait" in bad.json()["detail"]
