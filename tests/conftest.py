"""Shared fixtures; tests are marked by folder (unit, integration, models, gpu, browser)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LiftoffServer
from tests.redis_server import RedisServer

_FOLDER_MARKERS = {"unit", "integration", "models", "gpu", "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for part in Path(str(item.fspath)).parts:
            if part in _FOLDER_MARKERS:
                item.add_marker(getattr(pytest.mark, part))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build llama-server (once per machine, minutes) before the tests that use it, outside their timeouts."""
    if any(any("llama_server" in name for name in getattr(item, "fixturenames", ())) for item in session.items):
        from tests.llama_server import ensure_llama_server

        ensure_llama_server()


@pytest.fixture
def liftoff(tmp_path: Path) -> Iterator[type[LiftoffServer]]:
    """A factory of real ``liftoff serve`` processes; every one started is stopped, and orphans are checked."""
    started: list[LiftoffServer] = []

    class Factory(LiftoffServer):
        def __init__(self, **kwargs: object) -> None:
            kwargs.setdefault("workdir", tmp_path / f"server{len(started)}")
            super().__init__(**kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Factory
    for server in started:
        server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
