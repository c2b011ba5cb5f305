"""Every route of every port's app, enumerated from the apps themselves, refuses a request without its port's key
(a 401 in the port's error shape), except the few that must stay open. A route added later without being listed
as open fails here: routes are open only by decision.

The apps are the gateway's own (``build_app`` with a real ``GatewayState``), exercised in-process; requests that
are let through reach a broker that was never started, which is fine: only the verdict of the key check matters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Route
from starlette.testclient import TestClient, WebSocketDenialResponse

from liftoff.config.loader import LoadedConfig
from liftoff.config.models import AppConfig
from liftoff.gateway.apps import PORT_SURFACES, build_app
from liftoff.gateway.server import Gateway
from liftoff.gateway.state import GatewayState
from liftoff.gateway.surfaces.ui import PAGES

INFERENCE_KEY = "inference-key-0123456789"
MANAGEMENT_KEY = "management-key-0123456789"
READER_SECRET = "reader-secret-0123456789"
KEY_OF = {"management_port": MANAGEMENT_KEY, "internal_port": READER_SECRET}

# (port key, route path) served without a key, whatever the keys. Nothing else may be.
OPEN: set[tuple[str, str]] = {
    *((port, path) for port in PORT_SURFACES for path in ("/healthz", "/health")),
    *(("port", path) for path in PAGES),
    ("port", "/ui/config.json"),
    ("port", "/ui/{path:path}"),
    ("sagemaker_port", "/ping"),
    ("vertex_port", "/vertex/health"),  # vertex_health_route: Vertex AI's health checks send no key
}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> GatewayState:
    config = AppConfig(
        api_keys=INFERENCE_KEY,
        management_api_keys=MANAGEMENT_KEY,
        reader_secret=READER_SECRET,
        vertex_health_route="/vertex/health",
        vertex_predict_route="/vertex/predict",
        repository_path=str(tmp_path_factory.mktemp("repository")),
    )
    return Gateway(LoadedConfig(server=config, readers={}))._build_state()


def fastapi_of(asgi: Any) -> FastAPI:
    """The FastAPI app at the bottom of a port's middleware stack."""
    while not isinstance(asgi, FastAPI):
        asgi = asgi.app
    return asgi


def concrete(path: str) -> str:
    """A request path for a route path: ``{name}`` → ``x``, ``{name:path}`` → ``x/y.js``."""
    return re.sub(r"\{[^}:]+\}", "x", re.sub(r"\{[^}]+:path\}", "x/y.js", path))


def routes_of(routes: list[Any]) -> list[Any]:
    """Every route, looking into included routers (FastAPI keeps them whole)."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)
        found += routes_of(list(included.routes)) if included is not None else [route]
    return found


def endpoints(port_key: str, state: GatewayState) -> list[tuple[str, str, str]]:
    """(route path, method, request path) of every route of the port's app; ``WEBSOCKET`` for a WebSocket route."""
    app = fastapi_of(build_app(port_key, state))
    found = []
    for route in routes_of(app.routes):
        if isinstance(route, APIWebSocketRoute):
            found.append((route.path, "WEBSOCKET", concrete(route.path)))
        elif isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or {"GET"}):
                found.append((route.path, method, concrete(route.path)))
        else:
            raise AssertionError(f"a route of a kind this test does not know: {route!r}")
    return found


def client(port_key: str, state: GatewayState, key: str | None = None) -> TestClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return TestClient(build_app(port_key, state), base_url="http://127.0.0.1:3000", headers=headers)


def check_refused(port_key: str, response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="liftoff"'
    body = response.json()
    if port_key == "openai_port":
        assert body["error"]["code"] == "unauthorized"
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error_type"] == "unauthorized"


def test_the_apps_have_the_routes_this_test_expects(state: GatewayState) -> None:
    """A sanity check of the enumeration: the hot routes, the docs and the WebSocket are among the routes."""
    paths = {port: {path for path, _, _ in endpoints(port, state)} for port in PORT_SURFACES}
    assert {"/generate", "/generate_stream", "/embed", "/docs", "/openapi.json"} <= paths["port"]
    assert {"/status", "/reader", "/reader/{reader_id}", "/metrics", "/config/{reader_id}"} <= paths["management_port"]
    assert "/reader" in paths["internal_port"]
    assert {"/vertex/health", "/vertex/predict"} <= paths["vertex_port"]
    assert {path for port, path in OPEN} <= set().union(*paths.values())


@pytest.mark.parametrize("port_key", list(PORT_SURFACES))
def test_every_route_needs_the_key_but_the_open_ones(port_key: str, state: GatewayState) -> None:
    with client(port_key, state) as outsider:
        for route_path, method, path in endpoints(port_key, state):
            if method == "WEBSOCKET":
                with pytest.raises(WebSocketDenialResponse) as denied, outsider.websocket_connect(path):
                    pass
                check_refused(port_key, denied.value)
            elif method != "HEAD":
                response = outsider.request(method, path, json={})
                if (port_key, route_path) in OPEN:
                    assert response.status_code != 401, (method, path)
                else:
                    check_refused(port_key, response)


@pytest.mark.parametrize("port_key", [key for key in PORT_SURFACES if key != "internal_port"])
def test_with_the_key_no_route_is_refused(port_key: str, state: GatewayState) -> None:
    key = KEY_OF.get(port_key, INFERENCE_KEY)
    with client(port_key, state, key) as insider:
        for _, method, path in endpoints(port_key, state):
            if method not in ("HEAD", "WEBSOCKET"):
                assert insider.request(method, path, json={}).status_code != 401, (method, path)


@pytest.mark.parametrize("port_key", list(PORT_SURFACES))
def test_another_ports_key_is_refused(port_key: str, state: GatewayState) -> None:
    keys = {INFERENCE_KEY, MANAGEMENT_KEY, READER_SECRET} - {KEY_OF.get(port_key, INFERENCE_KEY)}
    for key in keys:
        with client(port_key, state, key) as stranger:
            check_refused(port_key, stranger.get("/openapi.json"))


def test_public_metrics_opens_metrics_only(tmp_path: Path) -> None:
    config = AppConfig(management_api_keys=MANAGEMENT_KEY, public_metrics=True, repository_path=str(tmp_path))
    state = Gateway(LoadedConfig(server=config, readers={}))._build_state()
    with client("management_port", state) as scraper:
        assert scraper.get("/metrics").status_code == 200
        check_refused("management_port", scraper.get("/status"))


def test_without_keys_every_port_is_open_as_in_takeoff(tmp_path: Path) -> None:
    state = Gateway(LoadedConfig(server=AppConfig(repository_path=str(tmp_path)), readers={}))._build_state()
    for port_key in PORT_SURFACES:
        with client(port_key, state) as anyone:
            assert anyone.get("/openapi.json").status_code == 200
