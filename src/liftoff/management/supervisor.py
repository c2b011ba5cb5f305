"""The supervisor: spawns reader processes, watches them exit, and stops them (SIGTERM, then SIGKILL).

Readers run as ``python -m liftoff reader --supervised`` in their own session, so terminal signals reach only
the gateway, which stops them in order. A supervised reader also asks the kernel to SIGTERM it if the gateway
dies (``PR_SET_PDEATHSIG``), and exits when it loses the gateway's link: no orphans.

Every exit is reported (the manager decides about restarts) except those of processes stopped for good: deleted
readers, and every reader when the gateway shuts down. A reader's ``cuda_visible_devices`` becomes its process's
``CUDA_VISIBLE_DEVICES``, set before anything in it can load CUDA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from liftoff.config.models import ReaderConfig

logger = logging.getLogger(__name__)

READER_CONFIG_ENV = "LIFTOFF_READER_CONFIG"

ExitCallback = Callable[[str, int, int], None]  # reader id, pid, exit code (negative: killed by that signal)


@dataclass
class _Child:
    reader_id: str
    process: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = None
    final: bool = False  # stopped for good (deleted, gateway shutdown): its exit is not reported


@dataclass(frozen=True)
class SpawnSettings:
    """What every spawned reader is told."""

    gateway_address: str
    broker: str  # "embedded" (readers connect to gateway_address) or a Redis URL
    log_level: str
    log_format: str
    heartbeat_interval_ms: int
    default_batch_size: int
    repository_path: str
    shutdown_timeout_s: float


class Supervisor:
    """Owns the reader processes this gateway started."""

    def __init__(self, settings: SpawnSettings, on_exit: ExitCallback) -> None:
        self.settings = settings
        self._on_exit = on_exit
        self._children: dict[str, _Child] = {}

    def pid(self, reader_id: str) -> int | None:
        """The pid of a running reader process."""
        child = self._children.get(reader_id)
        return child.process.pid if child is not None and child.process.returncode is None else None

    def pids(self) -> list[int]:
        """Pids of every running reader process."""
        return [c.process.pid for c in self._children.values() if c.process.returncode is None]

    async def spawn(self, reader_id: str, config: ReaderConfig) -> int:
        """Start a reader process; return its pid."""
        settings = self.settings
        embedded = settings.broker == "embedded"
        broker = ["--gateway", settings.gateway_address] if embedded else ["--broker", settings.broker]
        env = dict(os.environ)
        env[READER_CONFIG_ENV] = json.dumps(config.manifest_dict())
        env["PYTHONUNBUFFERED"] = "1"
        if config.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
        command = [
            sys.executable, "-m", "liftoff", "reader",
            "--reader-id", reader_id,
            *broker,
            "--supervised",
            "--log-level", config.log_level or settings.log_level,
            "--log-format", settings.log_format,
            "--heartbeat-interval-ms", str(settings.heartbeat_interval_ms),
            "--default-batch-size", str(settings.default_batch_size),
            "--repository-path", settings.repository_path,
            "--shutdown-timeout-s", str(settings.shutdown_timeout_s),
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(*command, env=env, start_new_session=True)
        child = _Child(reader_id, process)
        self._children[reader_id] = child
        child.watcher = asyncio.create_task(self._watch(child), name=f"liftoff-watch-{reader_id}")
        logger.info("started reader %s (pid %d)", reader_id, process.pid)
        return process.pid

    async def _watch(self, child: _Child) -> None:
        code = await child.process.wait()
        if self._children.get(child.reader_id) is child:
            del self._children[child.reader_id]
        if not child.final:
            logger.warning("reader %s (pid %d) exited with code %d", child.reader_id, child.process.pid, code)
            self._on_exit(child.reader_id, child.process.pid, code)

    async def wait_exit(self, reader_id: str, within_s: float) -> bool:
        """Wait up to ``within_s`` seconds for a reader's process to exit; whether it has (or there is none)."""
        child = self._children.get(reader_id)
        if child is None or child.process.returncode is not None:
            return True
        try:
            await asyncio.wait_for(child.process.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, reader_id: str, grace_s: float, *, final: bool = True) -> None:
        """Stop one reader: SIGTERM, then SIGKILL after ``grace_s`` seconds. ``final``: for good (its exit is not
        reported); otherwise its exit is reported like any other (a reader declared dead, to be restarted)."""
        child = self._children.get(reader_id)
        if child is not None:
            await self._stop_child(child, grace_s, final=final)

    async def _stop_child(self, child: _Child, grace_s: float, *, final: bool = True) -> None:
        child.final = child.final or final
        process = child.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                logger.warning("reader %s did not stop in %.1f s; killing it", child.reader_id, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if child.watcher is not None:
            await child.watcher

    async def stop_all(self, grace_s: float) -> None:
        """Stop every reader process, in parallel."""
        children = list(self._children.values())
        await asyncio.gather(*(self._stop_child(child, grace_s) for child in children))

    def kill_all(self) -> None:
        """SIGKILL every reader process now (forced exit)."""
        for child in self._children.values():
            child.final = True
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
