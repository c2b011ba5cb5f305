"""The web UI's server side on a real gateway: pages and files on the inference port, ``/ui/config.json``, and the
CORS rules that let those pages (and only those) call the other ports. The pages themselves: tests/browser."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from liftoff.gateway.surfaces.ui import PAGES
from tests.helpers import LiftoffServer, echo_reader


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiftoffServer]:
    liftoff = LiftoffServer(workdir=tmp_path_factory.mktemp("web"), readers={"r1": echo_reader()},
                            server={"body_size_limit_bytes": 4096})  # fmt: skip
    try:
        yield liftoff.start()
    finally:
        liftoff.close()


def own(server: LiftoffServer, key: str = "port") -> dict[str, str]:
    """The headers a page of the gateway's ``key`` port sends to another port (as the browser would)."""
    return {"origin": f"http://127.0.0.1:{server.ports[key]}"}


def test_every_page_is_served_with_its_navigation(server: LiftoffServer) -> None:
    for path, (_, title) in PAGES.items():
        page = server.http.get(server.base + path)
        assert page.status_code == 200, path
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "<title>Liftoff" in page.text or f"<title>{title} · Liftoff" in page.text
        assert 'href="/ui/style.css"' in page.text
        assert "$" not in page.text.split("<main>")[0]  # every placeholder of the shell was filled
        if path != "/":
            assert f'<a href="{path}" aria-current="page">' in page.text


def test_ui_files_and_nothing_else(server: LiftoffServer) -> None:
    script = server.http.get(server.base + "/ui/js/common.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "export" in script.text
    assert server.http.get(server.base + "/ui/style.css").headers["content-type"] == "text/css; charset=utf-8"
    for path in ("/ui/nothing.js", "/ui/../surfaces/ui.py", "/ui/%2e%2e/surfaces/ui.py", "/ui/js", "/ui/README"):
        missing = server.http.get(server.base + path)
        assert missing.status_code == 404, path
        assert missing.json()["error_type"] == "not_found"
    # the UI is on the inference port only, and outside its OpenAPI description
    assert server.http.get(server.mgmt + "/playground").status_code == 404
    assert not [path for path in server.http.get(server.base + "/openapi.json").json()["paths"] if "ui" in path]


def test_ui_config_names_the_ports(server: LiftoffServer) -> None:
    body = server.http.get(server.base + "/ui/config.json").json()
    ports = {"inference" if key == "port" else key.removesuffix("_port"): port for key, port in server.ports.items()}
    assert body["ports"] == ports
    assert body["enable_metrics"] is True
    assert body["keys"] == {"inference": False, "management": False}


def test_the_gateway_pages_may_call_the_other_ports(server: LiftoffServer) -> None:
    asks = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
    preflight = server.http.options(server.mgmt + "/reader", headers={**own(server), **asks})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == own(server)["origin"]
    assert set(preflight.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST", "DELETE"}
    status = server.http.get(server.mgmt + "/status", headers=own(server))
    assert status.headers["access-control-allow-origin"] == own(server)["origin"]
    metrics = server.http.get(server.mgmt + "/metrics", headers=own(server))
    assert metrics.headers["access-control-allow-origin"] == own(server)["origin"]
    # the fast routes of the OpenAI port too, and errors (a body over the limit) carry the headers
    openai = server.url("openai_port")
    preflight = server.http.options(openai + "/v1/embeddings", headers={
        **own(server), "access-control-request-method": "POST"})  # fmt: skip
    assert preflight.headers["access-control-allow-origin"] == own(server)["origin"]
    refused = server.http.post(openai + "/v1/embeddings", headers=own(server), json={"input": "x", "model": "nope"})
    assert refused.status_code in {400, 404}
    assert refused.headers["access-control-allow-origin"] == own(server)["origin"]
    too_big = server.http.post(server.base + "/generate", headers=own(server, "openai_port"), content=b"x" * 5000)
    assert too_big.status_code == 413
    assert too_big.headers["access-control-allow-origin"] == own(server, "openai_port")["origin"]


def test_other_pages_may_not(server: LiftoffServer) -> None:
    before = server.status()["status"]["loading_readers"] | server.status()["status"]["live_readers"]
    foreign: dict[str, Any] = {"origin": "http://evil.example", "content-type": "text/plain"}
    created = server.http.post(server.mgmt + "/reader", headers=foreign,
                               content=b'{"model_name": "echo", "device": "cpu", "consumer_group": "x"}')  # fmt: skip
    assert created.status_code == 403
    assert created.json()["error_type"] == "forbidden"
    assert "access-control-allow-origin" not in created.headers
    after = server.status()["status"]["loading_readers"] | server.status()["status"]["live_readers"]
    assert after.keys() == before.keys()
    # the same host on a port that is not the gateway's is foreign too
    other_port = {"origin": "http://127.0.0.1:9"}
    preflight = server.http.options(server.mgmt + "/reader", headers={
        **other_port, "access-control-request-method": "POST"})  # fmt: skip
    assert preflight.status_code == 403
    read = server.http.get(server.mgmt + "/status", headers=other_port)
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers
    # the OpenAI port answers in its own error shape
    chat = server.http.post(server.url("openai_port") + "/v1/chat/completions", headers=other_port, json={})
    assert chat.status_code == 403
    assert chat.json()["error"]["code"] == "forbidden"


def test_web_pages_cannot_open_the_readers_websocket(server: LiftoffServer) -> None:
    """Browsers apply no CORS to WebSockets: a handshake with an Origin (a page) is refused on the internal port."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = f"ws://{server.internal_address}/reader"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="http://evil.example:3000", open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert server.generate("still served").status_code == 200
