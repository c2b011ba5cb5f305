"""The state every port's app shares: configuration, registry, broker, dispatcher and reader manager."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection

from liftoff.broker.base import GatewayBroker
from liftoff.config.models import AppConfig
from liftoff.core.frames import HeartbeatFrame, LoadedFrame, OutputFrame, RegisterFrame
from liftoff.gateway.dispatch import Dispatcher
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.logs import RequestLog
from liftoff.management.manager import ReaderManager
from liftoff.management.registry import ReaderRegistry


@dataclass
class GatewayState:
    """Shared by every app of one gateway process (``app.state.liftoff``)."""

    config: AppConfig
    registry: ReaderRegistry
    broker: GatewayBroker
    dispatcher: Dispatcher
    manager: ReaderManager
    metrics: GatewayMetrics | None = None  # None when enable_metrics is false
    request_log: RequestLog | None = None  # None when log_requests is false (or the level is above INFO)

    def status(self) -> dict[str, Any]:
        """The management ``GET /status`` body (takeoff-spec §2.2.1)."""
        reserved = self.broker.reserved_groups(self.config.reserved_groups())
        return {"config": self.config.status_view(), "status": self.registry.status(reserved)}

    def ports(self) -> list[int]:
        """Every port this gateway serves, inference port first."""
        return [getattr(self.config, name) for name in self.config.port_fields()]


def get_state(connection: HTTPConnection) -> GatewayState:
    """The gateway state of the app serving ``connection``."""
    state: GatewayState = connection.app.state.liftoff
    return state


class BrokerEventRouter:
    """Sends broker events where they belong: outputs to the dispatcher, reader events to the registry."""

    def __init__(self, dispatcher: Dispatcher, registry: ReaderRegistry, manager: ReaderManager) -> None:
        self._dispatcher = dispatcher
        self._registry = registry
        self._manager = manager

    def on_outputs(self, frames: list[OutputFrame]) -> None:
        self._dispatcher.on_outputs(frames)

    def on_reader_register(self, frame: RegisterFrame) -> None:
        self._registry.on_reader_register(frame)

    def on_reader_loaded(self, reader_id: str, frame: LoadedFrame) -> None:
        self._manager.on_reader_loaded(reader_id, frame)

    def on_reader_load_failed(self, reader_id: str, reason: str) -> None:
        self._registry.on_reader_load_failed(reader_id, reason)

    def on_reader_heartbeat(self, reader_id: str, frame: HeartbeatFrame) -> None:
        self._registry.on_reader_heartbeat(reader_id, frame)

    def on_reader_lost(self, reader_id: str, reason: str) -> None:
        self._manager.on_reader_lost(reader_id, reason)

    def on_reader_removed(self, reader_id: str) -> None:
        self._registry.remove(reader_id)
