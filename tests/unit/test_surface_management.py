"""The management surface (port 3001, ``liftoff.gateway.surfaces.management``) in process: ``/status``,
``/reader_groups``, ``GET``/``POST``/``DELETE /reader``, ``/config/{id}``, LoRA changes and ``/metrics``. Readers
join through the fake broker's events, and those ``POST /reader`` starts come from a supervisor double."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from liftoff.core.ids import consumer_name
from liftoff.protocol.management import StatusResponse
from tests.unit.conftest import GatewayFactory
from tests.unit.fake_reader import HOLD
from tests.unit.inprocess import InProcessGateway
from tests.unit.test_surface_native import check_error, post, until


async def get(gateway: InProcessGateway, path: str) -> Any:
    async with gateway.client("management_port") as http:
        return await http.get(path)


async def manage(gateway: InProcessGateway, method: str, path: str, body: Any = None) -> Any:
    async with gateway.client("management_port") as http:
        return await http.request(method, path, json=body)


# ---- status -----------------------------------------------------------------------------------------------------


async def test_status_is_takeoffs_schema(gateway: InProcessGateway) -> None:
    gateway.broker.connect("loading", ("side",), loaded=False)
    gateway.broker.connect("gone", ("side",))
    gateway.broker.disconnect("gone", "it crashed")
    response = await get(gateway, "/status")
    assert response.status_code == 200
    body = response.json()
    StatusResponse.model_validate(body)
    assert set(body) == {"config", "status"}
    assert body["config"]["port"] == 3000
    assert body["config"]["reserved_consumers"] == "primary"
    status = body["status"]
    assert status["live_readers"] == {
        "reader-a": {
            "consumer_groups": ["primary"],
            "consumer_name": consumer_name("reader-a"),
            "device": "cpu",
            "model_name": "echo",
            "model_type": "CAUSAL",
            "pids": [],
        }
    }
    assert list(status["loading_readers"]) == ["loading"]
    assert list(status["dead_readers"]) == ["gone"]
    assert set(status["last_heartbeat"]) == {"reader-a", "loading", "gone"}
    assert status["last_heartbeat"]["reader-a"]["heartbeat_wait_interval"] == 1000
    assert status["reserved_consumers"] == ["primary"]


async def test_reader_groups(gateway: InProcessGateway) -> None:
    gateway.broker.connect("multi", ("primary", "side"), loaded=False)
    groups = (await get(gateway, "/reader_groups")).json()
    assert [(entry["reader_id"], entry["ready"]) for entry in groups["primary"]] == [
        ("reader-a", True),
        ("multi", False),
    ]
    assert groups["side"] == [
        {
            "reader_id": "multi",
            "device": "cpu",
            "model_name": "echo",
            "model_type": "CAUSAL",
            "pids": [],
            "ready": False,
        }
    ]


async def test_reader_detail_says_why_a_reader_died(gateway: InProcessGateway) -> None:
    gateway.broker.disconnect("reader-a", "silent for 900 ms with requests in flight")
    detail = (await get(gateway, "/reader/reader-a")).json()
    assert (detail["reader_id"], detail["state"]) == ("reader-a", "dead")
    assert detail["error"] == "silent for 900 ms with requests in flight"
    assert detail["managed"] is False
    assert detail["restart_policy"] is None  # headless: never restarted by this gateway
    assert detail["config"]["model_name"] == "echo"
    check_error(await get(gateway, "/reader/ghost"), 404, "not_found")


async def test_config_of_a_reader(gateway: InProcessGateway) -> None:
    config = (await get(gateway, "/config/reader-a")).json()
    assert (config["model_name"], config["device"], config["consumer_group"]) == ("echo", "cpu", "primary")
    assert None not in config.values()
    check_error(await get(gateway, "/config/ghost"), 404, "not_found")


# ---- creating and deleting readers ------------------------------------------------------------------------------


async def test_create_use_and_delete_a_reader(gateway: InProcessGateway) -> None:
    created = await manage(
        gateway,
        "POST",
        "/reader",
        {"model_name": "echo", "device": "cpu", "consumer_group": "side", "max_batch_size": 2},
    )
    assert created.status_code == 201
    reader_id = created.json()["reader_id"]
    assert [spawned for spawned, _ in gateway.supervisor.spawned] == [reader_id]
    await until(lambda: reader_id in gateway.broker.readers)  # its process connected and loaded
    detail = (await get(gateway, f"/reader/{reader_id}")).json()
    assert (detail["state"], detail["managed"], detail["restart_policy"]) == ("live", True, "on-failure")
    assert (await post(gateway, "/generate", {"text": "to the side", "consumer_group": "side"})).json() == {
        "text": "to the side"
    }
    deleted = await manage(gateway, "DELETE", f"/reader/{reader_id}")
    assert deleted.status_code == 204
    assert gateway.supervisor.stopped == [reader_id]
    assert gateway.broker.stopped == [(reader_id, "the reader was deleted")]
    assert reader_id not in (await get(gateway, "/status")).json()["status"]["live_readers"]
    check_error(await manage(gateway, "DELETE", f"/reader/{reader_id}"), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "status", "error_type", "param"),
    [
        ({"model_name": "/etc/passwd", "device": "cpu"}, 400, "invalid_request", "model_name"),
        ({"model_name": "echo", "device": "cpu", "max_batch_size": 512}, 400, "invalid_request", "max_batch_size"),
        ({"model_name": "echo", "device": "cpu", "max_batch_size": "8"}, 422, "validation_error", "max_batch_size"),
        ({"model_name": "echo", "device": "cpu", "colour": "red"}, 400, "invalid_request", "colour"),
        ({"device": "cpu"}, 422, "validation_error", "model_name"),
        (
            {"model_name": "echo", "device": "cpu", "backend_options": {"token_delay_ms": 10**9}},
            400,
            "invalid_request",
            "backend_options.token_delay_ms",
        ),
    ],
)
async def test_create_refusals_start_nothing(
    gateway: InProcessGateway, body: dict[str, Any], status: int, error_type: str, param: str
) -> None:
    response = await manage(gateway, "POST", "/reader", body)
    check_error(response, status, error_type, param_in=param)
    assert gateway.supervisor.spawned == []


async def test_max_readers(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_readers=1)
    body = {"model_name": "echo", "device": "cpu", "consumer_group": "side"}
    assert (await manage(gateway, "POST", "/reader", body)).status_code == 201
    assert (
        "max_readers" in check_error(await manage(gateway, "POST", "/reader", body), 400, "invalid_request")["detail"]
    )
    assert len(gateway.supervisor.spawned) == 1


# ---- LoRA adapters ----------------------------------------------------------------------------------------------


async def test_add_and_remove_a_lora_adapter(gateway: InProcessGateway) -> None:
    (Path(gateway.config.repository_path) / "adapters" / "sql").mkdir(parents=True)
    added = await manage(gateway, "POST", "/reader/reader-a/loras", {"name": "sql", "path": "adapters/sql"})
    assert added.status_code == 200, added.text
    assert added.json() == {"reader_id": "reader-a", "loras": ["sql"]}
    assert (await get(gateway, "/reader/reader-a")).json()["loras"] == "sql"
    async with gateway.client("openai_port") as http:
        assert "primary:sql" in [model["id"] for model in (await http.get("/v1/models")).json()["data"]]
    removed = await manage(gateway, "DELETE", "/reader/reader-a/loras/sql")
    assert removed.json() == {"reader_id": "reader-a", "loras": []}
    check_error(await manage(gateway, "DELETE", "/reader/reader-a/loras/sql"), 400, "invalid_request")


async def test_lora_refusals(gateway: InProcessGateway) -> None:
    gateway.broker.connect("loading", ("side",), loaded=False)
    body = {"name": "sql", "path": "adapters/sql"}
    check_error(await manage(gateway, "POST", "/reader/ghost/loras", body), 404, "not_found")
    check_error(await manage(gateway, "POST", "/reader/loading/loras", body), 400, "invalid_request")
    outside = {"name": "sql", "path": "/etc"}
    check_error(await manage(gateway, "POST", "/reader/reader-a/loras", outside), 400, "invalid_request")
    check_error(
        await manage(gateway, "POST", "/reader/reader-a/loras", {"name": "a b", "path": "x"}), 400, "invalid_request"
    )
    assert [frame.kind for frame in gateway.broker.submitted] == []


# ---- metrics ----------------------------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (labels in any order)."""
    for match in re.finditer(rf"^{re.escape(name)}{{(.*)}} (\S+)$", text, re.MULTILINE):
        if dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    raise AssertionError(f"no {name}{labels} in the exposition")


async def test_metrics_count_requests_tokens_and_queues(gateway: InProcessGateway) -> None:
    gateway.broker.connect("slow", ("side",), capacity=1).behaviour = HOLD
    assert (await post(gateway, "/generate", {"text": "one two three"})).status_code == 200
    waiting = [
        asyncio.create_task(post(gateway, "/generate", {"text": "x", "consumer_group": "side"})) for _ in range(2)
    ]
    await until(lambda: gateway.broker.queue_depth("side") == 1)
    response = await get(gateway, "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "generate_tokens", consumer_group="primary") == 3
    assert sample(text, "liftoff_prompt_tokens", consumer_group="primary") == 3
    assert sample(text, "liftoff_requests_waiting", consumer_group="side") == 1
    assert sample(text, "liftoff_requests_running", consumer_group="side") == 1
    assert sample(text, "liftoff_readers", state="live") == 2
    assert sample(text, "http_requests_total", port="3000", path="/generate", method="POST", status="200") == 1
    gateway.broker.disconnect("slow")
    assert [(await task).status_code for task in waiting] == [503, 503]


async def test_metrics_off_is_a_404(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(enable_metrics=False)
    check_error(await get(gateway, "/metrics"), 404, "not_found")
