"""The supervisor: spawns reader processes, watches them exit, and stops them (SIGTERM, then SIGKILL).

Readers run as ``python -m liftoff reader --supervised`` in their own session, so terminal signals reach only
the gateway, which stops them in order. A supervised reader also asks the kernel to SIGTERM it if the gateway
dies (``PR_SET_PDEATHSIG``), and exits when it loses the gateway's link: no orphans.

Every exit is reported (the manager decides about restarts) except those of processes stopped for good: deleted
readers, and every reader when the gateway shuts down. A reader's ``cuda_visible_devices`` becomes its process's
``CUDA_VISIBLE_DEVICES``, set before anything in it can load CUDA.

Secrets travel in the environment, never on the command line (which every user of the machine can read): the
reader secret (``TAKEOFF_READER_SECRET``) and the broker URL (``TAKEOFF_BROKER``, which may hold Redis'
password). The API keys are not a reader's business and are left out of its environment. A reader created
through the management API (:meth:`Supervisor.restrict`) may not download models unless ``allow_downloads``.
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
# Variables of the gateway's environment a reader must not inherit (keys it has no use for).
WITHHELD_ENV = ("TAKEOFF_API_KEYS", "TAKEOFF_API_KEYS_FILE", "TAKEOFF_MANAGEMENT_API_KEYS",
                "TAKEOFF_MANAGEMENT_API_KEYS_FILE", "TAKEOFF_READER_SECRET_FILE")  # fmt: skip

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
    reader_secret: str | None = None
    allow_downloads: bool = True  # for readers created through the management API (restricted ones)


class Supervisor:
    """Owns the reader processes this gateway started."""

    def __init__(self, settings: SpawnSettings, on_exit: ExitCallback) -> None:
        self.settings = settings
        self._on_exit = on_exit
        self._children: dict[str, _Child] = {}
        self._restricted: set[str] = set()

    def restrict(self, reader_id: str, restricted: bool = True) -> None:
        """Whether the processes of ``reader_id`` (this one and its restarts) came from the management API, and so
        may download models only if ``allow_downloads``."""
        if restricted:
            self._restricted.add(reader_id)
        else:
            self._restricted.discard(reader_id)

    def environment(self, reader_id: str, config: ReaderConfig) -> dict[str, str]:
        """The environment of a reader's process: the gateway's, less its keys, plus the reader's settings."""
        settings = self.settings
        env = {key: value for key, value in os.environ.items() if key not in WITHHELD_ENV}
        env[READER_CONFIG_ENV] = json.dumps(config.manifest_dict())
        env["PYTHONUNBUFFERED"] = "1"
        env["TAKEOFF_BROKER"] = settings.broker
        env.pop("TAKEOFF_READER_SECRET", None)
        if settings.reader_secret is not None:
            env["TAKEOFF_READER_SECRET"] = settings.reader_secret
        if reader_id in self._restricted and not settings.allow_downloads:
            env["HF_HUB_OFFLINE"] = "1"
        if config.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
        return env

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
        broker = ["--gateway", settings.gateway_address] if settings.broker == "embedded" else []
        env = self.environment(reader_id, config)
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
