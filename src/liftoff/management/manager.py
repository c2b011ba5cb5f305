"""Orchestration behind the management API: create and delete readers, and keep the manifest in step.

Creating a reader registers it as loading, spawns its process and writes it into ``config.yaml`` (when a
manifest is in use). Deleting one evicts it from the broker (unstarted requests go elsewhere), forgets it,
stops its process and removes it from the manifest. Readers that fail are restarted by the :class:`Healer`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from liftoff.broker.base import GatewayBroker
from liftoff.config import manifest
from liftoff.config.manifest import ManifestError
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotFoundError
from liftoff.core.frames import LoadedFrame
from liftoff.core.ids import new_reader_id
from liftoff.core.types import ReaderState
from liftoff.management.healer import Healer
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for
from liftoff.management.restarts import RestartLimits
from liftoff.management.supervisor import Supervisor

logger = logging.getLogger(__name__)


class ReaderManager:
    """Creates, deletes and stops readers."""

    def __init__(
        self,
        registry: ReaderRegistry,
        broker: GatewayBroker,
        supervisor: Supervisor,
        manifest_path: Path | None,
        stop_timeout_s: float,
        limits: RestartLimits | None = None,
    ) -> None:
        self.registry = registry
        self.broker = broker
        self.supervisor = supervisor
        self.manifest_path = manifest_path
        self.stop_timeout_s = stop_timeout_s
        self.healer = Healer(registry, broker, supervisor, limits or RestartLimits())

    async def create(self, config: ReaderConfig, reader_id: str | None = None, *, persist: bool = True) -> str:
        """Start a new reader process; it shows as loading until its model is loaded."""
        reader_id = reader_id or new_reader_id()
        existing = self.registry.get(reader_id)
        if existing is not None and existing.state is not ReaderState.DEAD:
            raise InvalidRequestError(f"reader {reader_id!r} already exists; delete it first", param="reader_id")
        if self.supervisor.pid(reader_id) is not None:  # the process of the dead reader it replaces, if stuck
            await self.supervisor.stop(reader_id, self.stop_timeout_s)
        record = ReaderRecord(reader_id=reader_id, config=config, info=info_for(config), managed=True)
        self.registry.add(record)
        try:
            pid = await self.supervisor.spawn(reader_id, config)
        except OSError as exc:
            self.registry.mark_dead(reader_id, f"could not start the reader process: {exc}")
            self.healer.failed_to_start(reader_id, config, f"could not start the reader process: {exc}")
            raise
        record.info.pids = [pid]
        self.healer.adopt(reader_id, config, pid)
        if persist and self.manifest_path is not None:
            await self._persist(manifest.add_reader, reader_id, config.manifest_dict())
        return reader_id

    async def delete(self, reader_id: str) -> None:
        """Stop a reader and forget it; 404 when unknown."""
        record = self.registry.get(reader_id)
        if record is None:
            raise NotFoundError(f"reader {reader_id!r} does not exist", param="reader_id")
        self.broker.stop_reader(reader_id, "the reader was deleted")
        self.registry.remove(reader_id)
        self.healer.forget(reader_id)
        await self.supervisor.stop(reader_id, self.stop_timeout_s)
        if self.manifest_path is not None:
            await self._persist(manifest.remove_reader, reader_id)
        logger.info("reader %s deleted", reader_id)

    def config_of(self, reader_id: str) -> ReaderConfig:
        """The configuration a reader runs with; 404 when unknown."""
        record = self.registry.get(reader_id)
        if record is None:
            raise NotFoundError(f"reader {reader_id!r} does not exist", param="reader_id")
        return record.config

    def on_process_exit(self, reader_id: str, pid: int, code: int) -> None:
        """A reader process exited (other than by a delete or the shutdown): restart it, or it stays dead."""
        self.healer.on_process_exit(reader_id, pid, code)

    def on_reader_loaded(self, reader_id: str, frame: LoadedFrame) -> None:
        """A reader is live."""
        self.registry.on_reader_loaded(reader_id, frame)
        self.healer.on_reader_loaded(reader_id)

    def on_reader_lost(self, reader_id: str, reason: str) -> None:
        """A reader's link is gone; a process of ours that does not exit by itself is stopped (and restarted)."""
        self.registry.on_reader_lost(reader_id, reason)
        self.healer.on_reader_lost(reader_id)

    async def _persist(self, change: object, *args: object) -> None:
        try:
            await asyncio.to_thread(change, self.manifest_path, *args)  # type: ignore[arg-type]
        except (OSError, ManifestError) as exc:
            logger.error("could not write the reader change into %s: %s", self.manifest_path, exc)

    async def shutdown(self) -> None:
        """Stop every reader this gateway started (restarts that were due are dropped)."""
        self.registry.closing = True
        await self.healer.shutdown()
        if not self.broker.shared:  # on a shared broker the readers of other gateways and headless ones stay
            for reader_id in list(self.registry.records):
                self.broker.stop_reader(reader_id, "the gateway is shutting down")
        await self.supervisor.stop_all(self.stop_timeout_s)
        await self.healer.join()
