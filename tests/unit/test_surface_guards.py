"""The layers in front of every surface, in process, on real requests that reach a reader: keys (bearer, X-API-Key,
Basic), CORS for the gateway's own pages, the ``Host`` allow-list, the body limit, and the OpenAPI pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from liftoff.gateway.apps import PORT_SURFACES
from tests.unit.conftest import GatewayFactory
from tests.unit.inprocess import InProcessGateway, make_config
from tests.unit.test_surface_native import check_error

API_KEY = "inference-key-0123456789"
OTHER_API_KEY = "second-inference-key-9876"
MANAGEMENT_KEY = "management-key-0123456789"


@pytest.fixture
async def keyed(gateway_factory: GatewayFactory) -> InProcessGateway:
    gateway = await gateway_factory(api_keys=f"{API_KEY},{OTHER_API_KEY}", management_api_keys=MANAGEMENT_KEY)
    gateway.broker.connect("reader-a")
    return gateway


# ---- keys -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "credentials",
    [
        {"headers": {"authorization": f"Bearer {API_KEY}"}},
        {"headers": {"authorization": f"bearer {OTHER_API_KEY}"}},
        {"headers": {"x-api-key": API_KEY}},
        {"auth": ("liftoff", API_KEY)},  # takeoff-client: http://liftoff:KEY@host
    ],
)
async def test_a_key_lets_generations_through(keyed: InProcessGateway, credentials: dict[str, Any]) -> None:
    async with keyed.client(**credentials) as http:
        response = await http.post("/generate", json={"text": "with a key"})
    assert response.json() == {"text": "with a key"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong-key"}, {"x-api-key": MANAGEMENT_KEY}, {"authorization": f"Token {API_KEY}"}],
)
async def test_without_the_key_nothing_reaches_a_reader(keyed: InProcessGateway, headers: dict[str, str]) -> None:
    async with keyed.client(headers=headers) as http:
        response = await http.post("/generate", json={"text": "no key"})
    check_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="liftoff"'
    assert keyed.broker.submitted == []


async def test_the_openai_port_refuses_in_openais_shape(keyed: InProcessGateway) -> None:
    body = {"model": "primary", "messages": [{"role": "user", "content": "hi"}]}
    async with keyed.client("openai_port") as http:
        refused = await http.post("/v1/chat/completions", json=body)
    async with keyed.client("openai_port", headers={"authorization": f"Bearer {API_KEY}"}) as http:
        served = await http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert served.json()["choices"][0]["message"]["content"] == "hi"


async def test_the_management_port_has_its_own_key(keyed: InProcessGateway) -> None:
    async with keyed.client("management_port", headers={"authorization": f"Bearer {API_KEY}"}) as http:
        check_error(await http.get("/status"), 401, "unauthorized")
    async with keyed.client("management_port", headers={"authorization": f"Bearer {MANAGEMENT_KEY}"}) as http:
        assert list((await http.get("/status")).json()["status"]["live_readers"]) == ["reader-a"]


async def test_open_paths_need_no_key(keyed: InProcessGateway) -> None:
    async with keyed.client() as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/playground")).status_code == 200
        assert (await http.get("/ui/config.json")).json()["keys"] == {"inference": True, "management": True}
        check_error(await http.get("/openapi.json"), 401, "unauthorized")


async def test_public_metrics(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(management_api_keys=MANAGEMENT_KEY, public_metrics=True)
    async with gateway.client("management_port") as http:
        assert (await http.get("/metrics")).status_code == 200
        check_error(await http.get("/reader_groups"), 401, "unauthorized")


# ---- CORS -------------------------------------------------------------------------------------------------------


async def test_the_web_uis_origin_may_call_the_management_port(gateway: InProcessGateway) -> None:
    origin = {"origin": "http://localhost:3000"}
    async with gateway.client("management_port", headers=origin) as http:
        preflight = await http.options(
            "/reader",
            headers={"access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
        status = await http.get("/status")
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert status.status_code == 200
    assert status.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_another_sites_page_gets_no_cors_and_cannot_post(gateway: InProcessGateway) -> None:
    async with gateway.client(headers={"origin": "http://evil.example"}) as http:
        read = await http.get("/status")
        posted = await http.post("/generate", json={"text": "drive-by"})
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers
    check_error(posted, 403, "forbidden")
    assert gateway.broker.submitted == []


async def test_a_page_on_another_host_with_a_gateway_port_is_refused(gateway: InProcessGateway) -> None:
    async with gateway.client("openai_port", headers={"origin": "http://attacker.test:3000"}) as http:
        posted = await http.post("/v1/completions", json={"model": "primary", "prompt": "x"})
    assert posted.status_code == 403
    assert posted.json()["error"]["code"] == "forbidden"


# ---- hosts, body limit, API docs --------------------------------------------------------------------------------


async def test_an_unknown_host_name_is_refused(gateway: InProcessGateway) -> None:
    async with gateway.client(host="rebound.example") as http:
        response = await http.post("/generate", json={"text": "rebinding"})
    check_error(response, 400, "unknown_host")
    assert gateway.broker.submitted == []
    async with gateway.client(host="192.0.2.7") as http:
        assert (await http.post("/generate", json={"text": "by address"})).json() == {"text": "by address"}


async def test_bodies_over_the_limit_are_413(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(body_size_limit_bytes=64)
    gateway.broker.connect("reader-a")
    async with gateway.client() as http:
        check_error(await http.post("/generate", json={"text": "x" * 100}), 413, "payload_too_large")
        assert (await http.post("/generate", json={"text": "short"})).status_code == 200
    async with gateway.client("openai_port") as http:
        response = await http.post("/v1/completions", json={"model": "primary", "prompt": "y" * 100})
    assert (response.status_code, response.json()["error"]["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize("port_key", list(PORT_SURFACES))
async def test_every_port_serves_its_openapi_document(gateway: InProcessGateway, port_key: str) -> None:
    async with gateway.client(port_key) as http:
        document = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
    assert document["info"]["title"] == f"Liftoff {PORT_SURFACES[port_key][0]} API"
    assert "/healthz" in document["paths"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_unknown_routes_and_methods(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        check_error(await http.get("/nowhere"), 404, "not_found")
        check_error(await http.get("/generate"), 405, "method_not_allowed")


def test_the_internal_port_refuses_pages_and_readers_of_another_broker(tmp_path: Path) -> None:
    gateway = InProcessGateway(make_config(tmp_path))  # its broker is not the embedded one: readers go elsewhere
    with TestClient(gateway.apps["internal_port"], base_url="http://127.0.0.1:3005") as client:
        with pytest.raises(WebSocketDisconnect) as page:
            client.websocket_connect("/reader", headers={"origin": "http://localhost:3000"}).__enter__()
        with pytest.raises(WebSocketDisconnect) as reader:
            client.websocket_connect("/reader").__enter__()
    assert (page.value.code, page.value.reason) == (
        4403,
        "readers do not send an Origin header; web pages may not connect here",
    )
    assert reader.value.code == 4404
    assert "external broker" in reader.value.reason
