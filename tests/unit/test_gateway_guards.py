"""``liftoff.gateway.auth`` and ``liftoff.gateway.hosts``: how a key is read from a request, compared, and refused;
which ``Host`` names a gateway answers to (DNS rebinding)."""

from __future__ import annotations

import base64
import hmac

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from liftoff.gateway import auth
from liftoff.gateway.auth import KeyGuard, presented_key
from liftoff.gateway.cors import CrossOriginMiddleware
from liftoff.gateway.errors import render_native, render_openai
from liftoff.gateway.hosts import HostGuard, HostNames, host_name

KEY = "right-key-0123456789"


def scope(*headers: tuple[str, str]) -> dict[str, object]:
    return {"type": "http", "headers": [(name.encode(), value.encode()) for name, value in headers]}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ((("authorization", f"Bearer {KEY}"),), KEY),
        ((("authorization", f"bearer   {KEY} "),), KEY),
        ((("x-api-key", KEY),), KEY),
        ((("authorization", basic("liftoff", KEY)),), KEY),  # takeoff-client with http://liftoff:KEY@host
        ((("authorization", basic(KEY, "")),), KEY),  # http://KEY@host
        ((("authorization", "Basic not-base64!"),), None),
        ((("authorization", "Digest abc"),), None),
        ((("authorization", basic("proxy", "its-own")), ("x-api-key", KEY)), KEY),  # a proxy's credentials
        ((), None),
    ],
)
def test_presented_key(headers: tuple[tuple[str, str], ...], key: str | None) -> None:
    assert presented_key(scope(*headers)) == (key.encode() if key else None)


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app_of(*keys: str, render: object = render_native) -> KeyGuard:
    inner = Starlette(routes=[Route("/{path:path}", _ok, methods=["GET", "POST"])])
    return KeyGuard(inner, keys, render, auth.OPEN_PATHS["port"], "api_keys")  # type: ignore[arg-type]


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    return calls


def test_keys_are_compared_as_digests_with_every_key_in_constant_time(compared: list[tuple[bytes, bytes]]) -> None:
    guard = app_of("first-key-0123456789", KEY, "third-key-0123456789")
    assert guard.accepts(KEY.encode())
    assert len(compared) == 3  # no early exit at the match
    assert all(len(a) == len(b) == 32 for a, b in compared)  # SHA-256 digests: the lengths tell nothing
    assert not guard.accepts(b"wrong")
    assert not guard.accepts(None)


async def get(app: object, path: str, **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:3000") as client:
        return await client.get(path, headers=headers)


async def test_a_request_without_the_key_gets_a_401_that_says_how_to_send_one() -> None:
    response = await get(app_of(KEY), "/generate")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="liftoff"'
    assert response.json()["error_type"] == "unauthorized"
    assert "Authorization: Bearer KEY" in response.json()["detail"]
    wrong = await get(app_of(KEY), "/generate", authorization="Bearer nope")
    assert wrong.status_code == 401
    assert "not one of this port's keys" in wrong.json()["detail"]
    assert "nope" not in wrong.text


async def test_the_openai_port_refuses_in_openai_shape() -> None:
    response = await get(app_of(KEY, render=render_openai), "/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("path", ["/healthz", "/health", "/", "/chat", "/ui/js/common.js", "/ui/config.json"])
async def test_open_paths_need_no_key(path: str) -> None:
    assert (await get(app_of(KEY), path)).status_code == 200


@pytest.mark.parametrize("path", ["/ui", "/uix", "/chat/", "/healthz/x", "/docs", "/openapi.json", "//ui/x"])
async def test_paths_like_open_ones_are_not_open(path: str) -> None:
    assert (await get(app_of(KEY), path)).status_code == 401


async def test_a_page_of_the_gateway_can_read_a_401_and_ask_with_the_key() -> None:
    """The key check sits inside the CORS layer: the preflight needs no key, and a 401 carries CORS headers."""
    app = CrossOriginMiddleware(app_of(KEY), [3000, 3001], render_native)
    transport = httpx.ASGITransport(app=app)
    origin = {"origin": "http://127.0.0.1:3000"}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:3001") as client:
        asking = {"access-control-request-method": "GET", "access-control-request-headers": "authorization"}
        preflight = await client.options("/status", headers={**origin, **asking})
        assert preflight.status_code == 200
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = await client.get("/status", headers=origin)
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"
        allowed = await client.get("/status", headers={**origin, "authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200


# ---- Host names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [("Example.COM:3000", "example.com"), ("host.", "host"), ("[::1]:3001", "::1"), ("10.0.0.1", "10.0.0.1"),
     ("bad host:1", None), ("a:b:c", None), ("host:port", None), ("a@b", None), ("", None)],
)  # fmt: skip
def test_host_name(value: str, name: str | None) -> None:
    assert host_name(value) == name


NAMES = HostNames(["api.example.com", ".internal.example", " LB.example.org. "], own=["gpu-box", "localhost"])


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:3000", True),
        ("gpu-box:3001", True),
        ("app.localhost:3000", True),  # browsers resolve *.localhost to loopback themselves
        ("127.0.0.1:3000", True),
        ("[::1]:3001", True),
        ("10.20.30.40:3000", True),  # addresses: a rebinding page is reached through a name, never an address
        ("api.example.com", True),
        ("lb.example.org:443", True),
        ("internal.example", True),
        ("x.internal.example:3003", True),
        ("evil.example:3001", False),
        ("api.example.com.evil.example", False),
        ("xinternal.example", False),
        ("gpu-box.evil.example", False),
        ("", False),
    ],
)
def test_host_names(host: str, allowed: bool) -> None:
    assert NAMES.allows(host) is allowed


def test_a_star_allows_any_name() -> None:
    assert HostNames(["*"], own=[]).allows("anything.example:1")


async def test_a_rebinding_request_is_refused_before_cors_sees_it() -> None:
    """``Host: evil:3001`` with ``Origin: http://evil:3000``: same host, so the CORS check alone would pass it."""
    inner = CrossOriginMiddleware(app_of(KEY), [3000, 3001], render_native)
    app = HostGuard(inner, NAMES, render_native)
    headers = {"host": "evil.example:3001", "origin": "http://evil.example:3000", "authorization": f"Bearer {KEY}"}
    response = await get(app, "/status", **headers)
    assert response.status_code == 400
    assert response.json()["error_type"] == "unknown_host"
    assert "allowed_hosts" in response.json()["detail"]
    assert "access-control-allow-origin" not in response.headers
    assert (await get(app, "/status", host="localhost:3001", authorization=f"Bearer {KEY}")).status_code == 200
