"""``liftoff.gateway.cors``: the gateway's own pages may call its other ports from a browser; other pages may not."""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from liftoff.gateway.cors import CrossOriginMiddleware, origin_regex, same_host_origin
from liftoff.gateway.errors import render_native

PORTS = frozenset({3000, 3001, 3003})


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:3003", True),
        ("https://liftoff.example.com:3001", True),
        ("http://[::1]:3000", True),
        ("http://localhost:3002", False),
        ("http://localhost:30001", False),
        ("http://localhost", False),
        ("http://localhost:3000/path", False),
        ("ftp://localhost:3000", False),
        ("http://user@localhost:3000", False),
        ("null", False),
    ],
)
def test_origin_regex_takes_any_host_on_the_gateway_ports_only(origin: str, allowed: bool) -> None:
    assert bool(re.fullmatch(origin_regex(PORTS), origin)) is allowed


def test_origin_regex_of_default_ports_allows_the_origin_without_a_port() -> None:
    pattern = origin_regex({80, 3001})
    assert re.fullmatch(pattern, "http://gateway")
    assert not re.fullmatch(pattern, "https://gateway")
    assert re.fullmatch(origin_regex({443}), "https://gateway")
    assert not re.fullmatch(origin_regex(set()), "http://gateway:3000")


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://localhost:3000", "localhost:3001", True),
        ("http://LOCALHOST:3000", "localhost:3001", True),
        ("http://[::1]:3000", "[::1]:3001", True),
        ("http://gateway.internal:3000", "gateway.internal:3003", True),
        ("http://evil.example:3000", "localhost:3001", False),
        ("http://127.0.0.1:3000", "localhost:3001", False),
        ("http://localhost:4000", "localhost:3001", False),
        ("http://localhost:3000", "", False),
        ("http://localhost:bad", "localhost:3001", False),
    ],
)
def test_same_host_origin(origin: str, host: str, allowed: bool) -> None:
    assert same_host_origin(origin, host, PORTS) is allowed


async def _echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{request.method} reached the route")


def client() -> httpx.AsyncClient:
    routes = [Route("/thing", _echo, methods=["GET", "POST", "DELETE"])]
    app = CrossOriginMiddleware(Starlette(routes=routes), PORTS, render_native)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:3001")


async def test_an_own_page_gets_cors_headers_and_its_preflight_answered() -> None:
    async with client() as http:
        preflight = await http.options("/thing", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "DELETE",
            "access-control-request-headers": "content-type"})  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "DELETE" in preflight.headers["access-control-allow-methods"]
        posted = await http.post("/thing", headers={"origin": "http://localhost:3000"})
        assert posted.text == "POST reached the route"
        assert posted.headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_a_foreign_page_gets_no_cors_headers_and_cannot_change_anything() -> None:
    async with client() as http:
        for origin in ("http://evil.example", "http://evil.example:3000", "http://127.0.0.1:3000", "null"):
            read = await http.get("/thing", headers={"origin": origin})
            assert read.text == "GET reached the route"
            assert "access-control-allow-origin" not in read.headers
            for method in ("POST", "DELETE", "OPTIONS"):
                refused = await http.request(method, "/thing", headers={
                    "origin": origin, "access-control-request-method": "POST"})  # fmt: skip
                assert refused.status_code == 403, (origin, method)
                assert refused.json()["error_type"] == "forbidden"
                assert origin in refused.json()["detail"]
                assert "access-control-allow-origin" not in refused.headers


async def test_requests_without_an_origin_pass_untouched() -> None:
    async with client() as http:
        posted = await http.post("/thing")
        assert posted.text == "POST reached the route"
        assert "access-control-allow-origin" not in posted.headers
        assert "vary" not in posted.headers
