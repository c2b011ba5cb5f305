"""The gateway's real ASGI apps, in process, over a fake broker that implements :class:`GatewayBroker` for real.

:class:`InProcessGateway` builds the state the gateway process builds (``Gateway._build_state``: registry,
dispatcher, reader manager, metrics, the broker event router) with two doubles in place of what would start
processes: :class:`FakeBroker` (the broker the readers would connect to) and :class:`FakeSupervisor` (the one
that would spawn reader processes). Every port's app is ``build_app`` of the gateway, with all its layers (hosts,
CORS, keys, body limit, hot routes, FastAPI), and tests reach it with ``httpx.AsyncClient`` over
``httpx.ASGITransport`` (which buffers each answer whole: a stream is read once it has ended).

The fake broker answers like readers would, one frame per event-loop turn: generations echo their prompt word by
word (as the echo backend does) and end with a final frame; tokenizer services, embeddings (``DIMENSIONS`` floats
per input) and classifications answer with one result frame. Readers join through the broker events a real
broker sends (register, loaded, heartbeat, lost), so the registry, ``/status`` and the health checks are real.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from starlette.types import ASGIApp

from liftoff.config.loader import LoadedConfig
from liftoff.config.models import AppConfig, ReaderConfig
from liftoff.gateway import server
from liftoff.gateway.apps import PORT_SURFACES, build_app
from liftoff.gateway.state import GatewayState
from liftoff.management.supervisor import SpawnSettings, Supervisor
from tests.unit.fake_broker import FakeBroker


class FakeSupervisor(Supervisor):
    """A :class:`Supervisor` that starts no process: it records what it was asked, and a reader it "spawns" connects
    to the fake broker on the next loop turn (``on_spawn``), as its process would."""

    def __init__(self, settings: SpawnSettings, on_exit: Callable[[str, int, int], None]) -> None:
        super().__init__(settings, on_exit)
        self.spawned: list[tuple[str, ReaderConfig]] = []
        self.stopped: list[str] = []
        self.on_spawn: Callable[[str, ReaderConfig], None] | None = None
        self._pids = itertools.count(10_000)

    async def spawn(self, reader_id: str, config: ReaderConfig) -> int:
        self.spawned.append((reader_id, config))
        if self.on_spawn is not None:
            asyncio.get_running_loop().call_soon(self.on_spawn, reader_id, config)
        return next(self._pids)

    def pid(self, reader_id: str) -> int | None:
        del reader_id
        return None  # no process runs: nothing for the healer to reap

    async def stop(self, reader_id: str, grace_s: float, *, final: bool = True) -> None:
        del grace_s, final
        self.stopped.append(reader_id)

    async def stop_all(self, grace_s: float) -> None:
        del grace_s


def build_state(config: AppConfig, *, fake_broker: bool = True) -> tuple[GatewayState, FakeSupervisor]:
    """The gateway's own composition (``Gateway._build_state``) with a :class:`FakeSupervisor` in place of the one
    that would start reader processes, and a :class:`FakeBroker` in place of the broker ``config`` names (unless
    ``fake_broker`` is false: then the embedded broker, whose readers connect to the internal port's app)."""
    with pytest.MonkeyPatch.context() as patch:
        if fake_broker:
            patch.setattr(server, "gateway_broker", lambda _config, settings: FakeBroker(settings))
        patch.setattr(server, "Supervisor", FakeSupervisor)
        gateway = server.Gateway(LoadedConfig(server=config, readers={}))
        state = gateway._build_state()
    return state, cast(FakeSupervisor, gateway.supervisor)


def asgi_client(app: ASGIApp, base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client of ``app``, in process."""
    transport = httpx.ASGITransport(app=cast(Any, app))  # httpx types the ASGI app more narrowly than Starlette
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30, **kwargs)


class InProcessGateway:
    """Every port's app of one gateway over a :class:`FakeBroker` and a :class:`FakeSupervisor`."""

    def __init__(self, config: AppConfig) -> None:
        self.state, self.supervisor = build_state(config)
        self.config = config
        self.broker = cast(FakeBroker, self.state.broker)
        self.supervisor.on_spawn = self._spawned
        self.apps = {key: build_app(key, self.state) for key in PORT_SURFACES}

    def _spawned(self, reader_id: str, config: ReaderConfig) -> None:
        """A reader process the management API started connects and loads."""
        groups = tuple(config.consumer_group)
        self.broker.connect(reader_id, groups, model_name=config.model_name, config=config.public_dict())

    def client(self, port_key: str = "port", *, host: str = "localhost", **kwargs: Any) -> httpx.AsyncClient:
        """A client of the app of ``port_key``, addressed as ``http://<host>:<that port>``."""
        return asgi_client(self.apps[port_key], f"http://{host}:{getattr(self.config, port_key)}", **kwargs)

    async def close(self) -> None:
        await self.state.manager.shutdown()
        await self.broker.close()


def make_config(tmp_path: Path, **fields: Any) -> AppConfig:
    """A gateway configuration for in-process tests (``repository_path`` under ``tmp_path``)."""
    repository = tmp_path / "repository"
    repository.mkdir(exist_ok=True)
    return AppConfig(repository_path=str(repository), **fields)


def sse_data(body: str) -> list[tuple[str, str]]:
    """``(event, data)`` of each event of a server-sent event stream (``message`` unless named); the data lines of
    one event are joined with line feeds."""
    found = []
    for block in body.split("\n\n"):
        if not block:
            continue
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
            else:
                raise AssertionError(f"not an SSE line: {line!r} in {body!r}")
        found.append((event, "\n".join(data)))
    return found
