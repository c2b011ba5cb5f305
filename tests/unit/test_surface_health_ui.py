"""Health checks on every port (``liftoff.gateway.surfaces.health``) and the web UI of the inference port
(``liftoff.gateway.surfaces.ui``), in process, as docs/api.md specifies them."""

from __future__ import annotations

import asyncio

import pytest

from liftoff import __version__
from liftoff.gateway.apps import PORT_SURFACES
from liftoff.gateway.surfaces.ui import PAGES, SECURITY_HEADERS
from tests.unit.conftest import GatewayFactory
from tests.unit.inprocess import InProcessGateway
from tests.unit.test_surface_native import check_error, until

HEALTH_FIELDS = {"status", "state", "live_readers", "loading_readers", "dead_readers"}


# ---- health -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port_key", list(PORT_SURFACES))
async def test_every_port_answers_health(gateway: InProcessGateway, port_key: str) -> None:
    async with gateway.client(port_key) as http:
        for path in ("/healthz", "/health"):
            response = await http.get(path)
            assert response.status_code == 200
            assert response.json() == {
                "status": "ok",
                "state": "live",
                "live_readers": 1,
                "loading_readers": 0,
                "dead_readers": 0,
            }


async def test_health_states(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory()
    async with gateway.client() as http:
        nothing = await http.get("/healthz")
        gateway.broker.connect("reader-a", loaded=False)
        loading_live = await http.get("/healthz")
        loading = await http.get("/healthz", params={"state": "loading"})
    assert nothing.status_code == 503
    assert nothing.json()["status"] == "unavailable"
    assert set(nothing.json()) == HEALTH_FIELDS
    assert loading_live.status_code == 503
    assert loading.status_code == 200
    assert loading.json() == {
        "status": "ok",
        "state": "loading",
        "live_readers": 0,
        "loading_readers": 1,
        "dead_readers": 0,
    }


async def test_health_waits_for_a_reader(gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = await gateway_factory()
    registry = gateway.state.registry
    waits: list[float] = []
    wait_changed = registry.wait_changed

    async def watched(within_s: float) -> None:
        waits.append(within_s)
        await wait_changed(within_s)

    monkeypatch.setattr(registry, "wait_changed", watched)
    async with gateway.client() as http:
        waiting = asyncio.create_task(http.get("/healthz", params={"wait": "30s"}))
        await until(lambda: bool(waits))  # the check is waiting for a change
        assert not waiting.done()
        gateway.broker.connect("reader-a")
        response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200
    assert response.json()["live_readers"] == 1
    assert 29 < waits[0] <= 30


async def test_bad_health_parameters(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        check_error(await http.get("/healthz", params={"wait": "soon"}), 400, "invalid_request")
        check_error(await http.get("/healthz", params={"state": "dead"}), 422, "validation_error")
    async with gateway.client("openai_port") as http:
        error = (await http.get("/healthz", params={"wait": "soon"})).json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "wait")


# ---- the web UI -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PAGES))
async def test_every_page_is_served_with_its_security_headers(gateway: InProcessGateway, path: str) -> None:
    async with gateway.client() as http:
        response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    assert response.text.lstrip().lower().startswith("<!doctype html>")
    assert 'aria-current="page"' in response.text or path == "/"
    assert __version__ in response.text


async def test_ui_config_names_the_ports_and_which_need_keys(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(management_api_keys="management-key-0123456789")
    async with gateway.client() as http:
        response = await http.get("/ui/config.json")
    assert response.json() == {
        "version": __version__,
        "ports": {
            "inference": 3000,
            "management": 3001,
            "vertex": 3002,
            "openai": 3003,
            "snowflake": 3004,
            "internal": 3005,
            "sagemaker": 8080,
        },
        "enable_metrics": True,
        "keys": {"inference": False, "management": True},
    }
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/js/common.js", "text/javascript; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ],
)
async def test_ui_files(gateway: InProcessGateway, path: str, media_type: str) -> None:
    async with gateway.client() as http:
        response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content


@pytest.mark.parametrize("path", ["/ui/nothing.js", "/ui/shell.txt", "/ui/..%2F..%2Fapps.py", "/ui/pages"])
async def test_ui_files_outside_the_ui_are_404(gateway: InProcessGateway, path: str) -> None:
    async with gateway.client() as http:
        check_error(await http.get(path), 404, "not_found")


async def test_the_ui_is_served_on_the_inference_port_only(gateway: InProcessGateway) -> None:
    async with gateway.client("management_port") as http:
        check_error(await http.get("/playground"), 404, "not_found")
