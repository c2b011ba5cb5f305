"""``POST /reader/{id}/loras`` and ``DELETE /reader/{id}/loras/{name}`` on real gateways with echo and API-less
readers, through the embedded broker and through Redis: the request reaches the one reader and its answer comes
back, every refusal is a 400 or 404 that says what to do, and the routes take the management key.

Adapters that load and serve are in tests/models/test_lora_runtime.py (they need a real model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiftoffServer, echo_reader
from tests.redis_server import RedisServer

MANAGEMENT_KEY = "management-key-for-the-lora-tests"


@pytest.fixture(params=["embedded", "redis"])
def server(request: pytest.FixtureRequest, liftoff: type[LiftoffServer], tmp_path: Path) -> Iterator[LiftoffServer]:
    """A gateway with a management key and one echo reader, on either broker."""
    settings: dict[str, object] = {"management_api_keys": MANAGEMENT_KEY}
    redis = RedisServer(tmp_path / "redis").start() if request.param == "redis" else None
    if redis is not None:
        settings["broker"] = redis.url
    try:
        instance = liftoff(workdir=tmp_path / "gateway", readers={"echo1": echo_reader()}, server=settings).start()
        (instance.workdir / "artefacts" / "adapters" / "sql").mkdir(parents=True)
        yield instance
        instance.close()  # before Redis goes
    finally:
        if redis is not None:
            redis.stop()


def test_a_reader_whose_backend_holds_no_adapters_says_so(server: LiftoffServer) -> None:
    response = server.http.post(server.mgmt + "/reader/echo1/loras", json={"name": "sql", "path": "adapters/sql"})
    assert response.status_code == 400, response.text
    assert "the echo backend holds no LoRA adapters" in response.json()["detail"]
    gone = server.http.delete(server.mgmt + "/reader/echo1/loras/sql")
    assert gone.status_code == 404, gone.text
    assert "'sql' is not an adapter of this reader" in gone.json()["detail"]
    assert "loras" not in server.readers()["echo1"]


def test_unknown_readers_bad_bodies_and_refused_paths(server: LiftoffServer) -> None:
    post = server.http.post
    response = post(server.mgmt + "/reader/nope/loras", json={"name": "sql", "path": "adapters/sql"})
    assert response.status_code == 404
    assert "reader 'nope' does not exist" in response.json()["detail"]
    assert server.http.delete(server.mgmt + "/reader/nope/loras/sql").status_code == 404
    cases = [
        ({"name": "my adapter", "path": "adapters/sql"}, "not a valid adapter name"),
        ({"name": "sql", "path": "/etc"}, "is not an adapter POST /reader/{reader_id}/loras may load"),
        ({"name": "sql", "path": "../outside"}, "is not an adapter POST /reader/{reader_id}/loras may load"),
        ({"name": "sql", "path": "solo-hub-name"}, "org/name"),
        ({"name": "sql", "path": "a,b"}, "has a comma"),
        ({"name": "sql", "path": "adapters/sql", "extra": 1}, "extra"),
    ]
    for body, says in cases:
        response = post(server.mgmt + "/reader/echo1/loras", json=body)
        assert response.status_code == 400, (body, response.text)
        assert says in response.text, (body, response.text)


def test_the_routes_take_the_management_key(server: LiftoffServer) -> None:
    body = {"name": "sql", "path": "adapters/sql"}
    with httpx.Client(timeout=10) as bare:
        assert bare.post(server.mgmt + "/reader/echo1/loras", json=body).status_code == 401
        assert bare.delete(server.mgmt + "/reader/echo1/loras/sql").status_code == 401
        wrong = {"Authorization": "Bearer not-the-key-0123456789"}
        assert bare.post(server.mgmt + "/reader/echo1/loras", json=body, headers=wrong).status_code == 401
        keyed = {"Authorization": f"Bearer {MANAGEMENT_KEY}"}
        assert bare.post(server.mgmt + "/reader/echo1/loras", json=body, headers=keyed).status_code == 400
