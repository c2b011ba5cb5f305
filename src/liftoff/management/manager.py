"""Orchestration behind the management API: create and delete readers, and keep the manifest in step.

``POST /reader`` (:meth:`ReaderManager.create_from_api`) first checks what it may start (management/policy.py:
a 400 and nothing started), then writes the reader into ``config.yaml`` (when a manifest is in use; a write that
fails is the client's error and nothing is started), then registers it as loading and spawns its process (if
that fails, the manifest entry is taken back). ``DELETE /reader/{id}`` takes the reader out of the manifest
first (if that fails, the reader keeps running and the client is told), then evicts it from the broker
(unstarted requests go elsewhere), forgets it and stops its process. One lock orders these changes, so that
concurrent calls cannot pass ``max_readers`` together. Readers that fail are restarted by the :class:`Healer`.

``POST /reader/{id}/loras`` and ``DELETE /reader/{id}/loras/{name}`` (:meth:`ReaderManager.add_lora`,
:meth:`ReaderManager.remove_lora`) change a live reader's LoRA adapters: the adapter is checked as ``POST
/reader``'s ``loras`` are (a 400 and nothing loaded), the reader makes the change (the gateway's ``ask``: a
request to that one reader), then its record, its restart configuration and its manifest entry follow what the
reader answered, so that a restart keeps the adapters. One lock per reader orders its changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from liftoff.broker.base import GatewayBroker
from liftoff.config import manifest
from liftoff.config.loras import join_loras, lora_entries, lora_entry
from liftoff.config.manifest import ManifestError
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError, NotFoundError
from liftoff.core.frames import LoadedFrame
from liftoff.core.ids import new_reader_id
from liftoff.core.types import ReaderState, RequestKind
from liftoff.management.healer import Healer
from liftoff.management.policy import ReaderLimits, check_lora, check_new_reader
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for
from liftoff.management.restarts import RestartLimits
from liftoff.management.supervisor import Supervisor

logger = logging.getLogger(__name__)

# Sends one request to the reader being changed and returns its result's data: (kind, payload, timeout in seconds).
Ask = Callable[[RequestKind, dict[str, Any], float], Awaitable[dict[str, Any]]]
ANSWER_GRACE_S = 10.0  # what the gateway waits beyond the reader's own deadline for its answer


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
        reader_limits: ReaderLimits | None = None,
    ) -> None:
        self.registry = registry
        self.broker = broker
        self.supervisor = supervisor
        self.manifest_path = manifest_path
        self.stop_timeout_s = stop_timeout_s
        self.healer = Healer(registry, broker, supervisor, limits or RestartLimits())
        self.reader_limits = reader_limits or ReaderLimits()
        self._changing = asyncio.Lock()
        self._lora_locks: dict[str, asyncio.Lock] = {}

    async def create_from_api(self, config: ReaderConfig) -> str:
        """``POST /reader``: check, write into the manifest, then start (see the module docstring)."""
        async with self._changing:
            running = sum(1 for record in self.registry.records.values() if record.managed)
            check_new_reader(config, self.reader_limits, running)
            reader_id = new_reader_id()
            if self.manifest_path is not None:
                await self._persist(manifest.add_reader, reader_id, config.manifest_dict(),
                                    failure="nothing was started")  # fmt: skip
            self.supervisor.restrict(reader_id)
            try:
                await self.create(config, reader_id)
            except BaseException:
                self.registry.remove(reader_id)
                self.healer.forget(reader_id)
                self.supervisor.restrict(reader_id, False)
                if self.manifest_path is not None:
                    await self._persist(manifest.remove_reader, reader_id, failure="its entry stays there")
                raise
            return reader_id

    async def create(self, config: ReaderConfig, reader_id: str | None = None) -> str:
        """Start a new reader process (one of the configuration, or one ``create_from_api`` checked and wrote into
        the manifest); it shows as loading until its model is loaded."""
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
        return reader_id

    async def delete(self, reader_id: str) -> None:
        """Stop a reader and forget it; 404 when unknown. It leaves the manifest first: if that fails, it runs on."""
        async with self._changing:
            if self.registry.get(reader_id) is None:
                raise NotFoundError(f"reader {reader_id!r} does not exist", param="reader_id")
            if self.manifest_path is not None:
                await self._persist(manifest.remove_reader, reader_id, failure="the reader keeps running")
            self.broker.stop_reader(reader_id, "the reader was deleted")
            self.registry.remove(reader_id)
            self.healer.forget(reader_id)
            self.supervisor.restrict(reader_id, False)
            self._lora_locks.pop(reader_id, None)
        await self.supervisor.stop(reader_id, self.stop_timeout_s)
        logger.info("reader %s deleted", reader_id)

    async def add_lora(self, reader_id: str, name: str, source: str, ask: Ask, timeout_s: float) -> list[str]:
        """``POST /reader/{id}/loras``: check, have the reader load the adapter (within ``timeout_s``), record it;
        the reader's adapters after the change."""
        record = self._changeable(reader_id)
        try:
            name, source = lora_entry(name, source)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="name") from None
        check_lora(name, source, self.reader_limits, "POST /reader/{reader_id}/loras", "path")
        async with self._lora_locks.setdefault(reader_id, asyncio.Lock()):
            payload = {"name": name, "source": source, "timeout_s": timeout_s}
            names = _names(await ask(RequestKind.ADD_LORA, payload, timeout_s + ANSWER_GRACE_S))
            try:
                await self._record_loras(record, names, (name, source), "the adapter was not added")
            except LiftoffError:
                with contextlib.suppress(LiftoffError):  # the first error is the one to tell
                    await ask(RequestKind.REMOVE_LORA, {"name": name}, ANSWER_GRACE_S)  # as it was before
                raise
        logger.info("reader %s: LoRA adapter %r added from %s", reader_id, name, source)
        return names

    async def remove_lora(self, reader_id: str, name: str, ask: Ask) -> list[str]:
        """``DELETE /reader/{id}/loras/{name}``: the reader refuses the adapter to new requests at once (those
        running under it finish), then the records follow; the reader's adapters after the change."""
        record = self._changeable(reader_id)
        async with self._lora_locks.setdefault(reader_id, asyncio.Lock()):
            names = _names(await ask(RequestKind.REMOVE_LORA, {"name": name}, ANSWER_GRACE_S))
            await self._record_loras(record, names, None, f"the reader no longer serves {name!r}, but a restart "
                                     "would load it again")  # fmt: skip
        logger.info("reader %s: LoRA adapter %r removed", reader_id, name)
        return names

    def _changeable(self, reader_id: str) -> ReaderRecord:
        """The record of a live reader whose adapters may change: 404 unknown, 400 not live."""
        record = self.registry.get(reader_id)
        if record is None:
            raise NotFoundError(f"reader {reader_id!r} does not exist", param="reader_id")
        if record.state is not ReaderState.LIVE:
            raise InvalidRequestError(
                f"reader {reader_id!r} is {record.state.value}: LoRA adapters are added and removed on a live reader "
                "only; wait until GET /reader/{reader_id} says live",
                param="reader_id",
            )
        return record

    async def _record_loras(self, record: ReaderRecord, names: list[str], added: tuple[str, str] | None,
                            failure: str) -> None:  # fmt: skip
        """Make the reader's record, restart configuration and manifest entry hold its adapters ``names``."""
        sources = dict(lora_entries(record.config.loras))
        if added is not None:
            sources[added[0]] = added[1]
        entries = [(name, sources[name]) for name in names if name in sources]
        config = record.config.model_copy(update={"loras": join_loras(entries)})
        if self.manifest_path is not None and record.managed:
            await self._persist(manifest.set_reader_loras, record.reader_id, [f"{n}={s}" for n, s in entries],
                                failure=failure)  # fmt: skip
        record.config = config
        self.registry.set_loras(record.reader_id, names)
        self.healer.reconfigure(record.reader_id, config)

    def forget_dead(self, reader_id: str, reason: str) -> None:
        """Forget a dead reader this gateway did not start (pruning; see management/prune.py)."""
        record = self.registry.get(reader_id)
        if record is None or record.managed:
            return
        logger.info("forgetting reader %s: %s", reader_id, reason)
        self.broker.forget_reader(reader_id)
        self.registry.remove(reader_id)

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

    async def _persist(self, change: object, *args: object, failure: str) -> None:
        """Apply ``change`` to the manifest; a failure is logged and raised as a 500 that says ``failure``."""
        try:
            await asyncio.to_thread(change, self.manifest_path, *args)  # type: ignore[arg-type]
        except (OSError, ManifestError) as exc:
            logger.error("could not write the reader change into %s: %s; %s", self.manifest_path, exc, failure)
            raise LiftoffError(f"could not write the change into {self.manifest_path}: {exc}; {failure}") from exc

    async def shutdown(self) -> None:
        """Stop every reader this gateway started (restarts that were due are dropped)."""
        self.registry.closing = True
        await self.healer.shutdown()
        if not self.broker.shared:  # on a shared broker the readers of other gateways and headless ones stay
            for reader_id in list(self.registry.records):
                self.broker.stop_reader(reader_id, "the gateway is shutting down")
        await self.supervisor.stop_all(self.stop_timeout_s)
        await self.healer.join()


def _names(result: dict[str, Any]) -> list[str]:
    """The adapter names of a reader's answer to a change."""
    names = result.get("loras")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise LiftoffError(f"the reader answered the LoRA change with {result!r}, not a list of adapter names")
    return names
