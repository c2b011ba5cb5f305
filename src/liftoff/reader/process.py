"""The reader process's asyncio side: connect to the gateway, load the model, serve, heartbeat, shut down.

The model loads on a thread of its own while the reader is already registered (so ``/status`` shows it
loading); then the engine thread serves requests. The loading thread ends before the engine starts: torch's
OpenMP thread pool belongs to the first thread that computes with it and lives as long as that thread, and
while it lives a second thread's pool runs about half as fast (SmolLM2 on 2 cores: 54 against 30 ms per decode
step), so an executor thread that stayed alive after loading would slow every step of the engine.

A supervised reader (spawned by ``liftoff serve``) exits when its gateway's link closes (with
``EXIT_GATEWAY_LOST`` unless it was asked to stop, so that its gateway knows to restart it); a headless reader
reconnects with backoff. SIGTERM drains: the reader takes no new work, finishes what it has (up to
``shutdown_timeout_s``), then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from liftoff.backends.base import BackendContext, EncoderBackend, GenerativeBackend, ModelBackend, RemoteBackend
from liftoff.backends.registry import create_backend
from liftoff.broker.base import LinkClosedError, ReaderLink
from liftoff.config.loras import lora_names
from liftoff.config.models import ReaderConfig
from liftoff.core import ids
from liftoff.core.clock import monotonic, now_ms
from liftoff.core.errors import InvalidRequestError
from liftoff.core.exits import EXIT_CLEAN, EXIT_GATEWAY_LOST, EXIT_LOAD_FAILED
from liftoff.core.frames import (
    AbortFrame,
    DrainFrame,
    HeartbeatFrame,
    LoadedFrame,
    LoadFailedFrame,
    RegisterFrame,
    RequestFrame,
    StopFrame,
    WelcomeFrame,
    error_frame,
)
from liftoff.core.runtime import tune_gc
from liftoff.core.types import LORA_KINDS, NEEDS, SERVES, ReaderInfo, RequestKind
from liftoff.reader import services
from liftoff.reader.batcher import Batcher
from liftoff.reader.engine import Emit, Engine
from liftoff.reader.relay import Relay
from liftoff.reader.worker import InboxWorker

logger = logging.getLogger(__name__)

LinkFactory = Callable[[], ReaderLink]
T = TypeVar("T")

# Requests a worker thread runs (the others are tokenizer services); adapter changes go to the engine too.
_WORKER_KINDS = frozenset({RequestKind.GENERATE, RequestKind.EMBED, RequestKind.CLASSIFY}) | LORA_KINDS


def make_worker(backend: ModelBackend, emit: Emit, reader_id: str) -> InboxWorker:
    """The engine of a generative backend, the batcher of an encoder, or the relay of a remote model."""
    if isinstance(backend, RemoteBackend):
        return Relay(backend, emit, reader_id)
    if isinstance(backend, EncoderBackend):
        return Batcher(backend, emit, reader_id)
    if isinstance(backend, GenerativeBackend):
        return Engine(backend, emit, reader_id)
    raise TypeError(f"{type(backend).__name__} is neither a generative nor an encoder backend")


async def in_own_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a new thread, which has ended when this returns (see the module docstring)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: the reader is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=run, name="liftoff-load", daemon=True)
    thread.start()
    result = await future
    await asyncio.to_thread(thread.join)  # it has only to return
    return result


def progress_bar(label: str, fraction: float, width: int = 30) -> str:
    """``label [#########.....................]  30%``: the loading bar shown on a terminal."""
    fraction = min(1.0, max(0.0, fraction))
    done = round(fraction * width)
    return f"{label} [{'#' * done}{'.' * (width - done)}] {fraction:4.0%}"


@dataclass(frozen=True)
class ReaderOptions:
    """How to run one reader."""

    reader_id: str
    config: ReaderConfig
    supervised: bool = False
    default_batch_size: int = 8
    repository_path: Path = field(default_factory=lambda: Path.home() / "artefacts")
    heartbeat_interval_ms: int = 1000
    shutdown_timeout_s: float = 30.0
    max_backoff_s: float = 10.0


class ReaderProcess:
    """One reader: a backend, an engine thread and a link to the gateway."""

    def __init__(self, options: ReaderOptions, link_factory: LinkFactory) -> None:
        self.options = options
        self._link_factory = link_factory
        self._link: ReaderLink | None = None
        self._backend: ModelBackend | None = None
        self._worker: InboxWorker | None = None  # the engine, the batcher or the relay
        self._progress = 0.0
        self._loaded = False
        self._exit_code: int | None = None
        self._failed = False  # a worker thread crashed or the link broke: exit without draining
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._stop_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer_name = ids.consumer_name(options.reader_id)
        self._tty = sys.stderr.isatty()

    # ---- entry point --------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.request_stop, f"received {signal.Signals(sig).name}")
        load_task: asyncio.Task[None] | None = None
        backoff = 0.2
        try:
            while not self._stop.is_set():
                link = self._link_factory()
                try:
                    welcome = await link.connect(self._register_frame())
                except LinkClosedError as exc:
                    if self.options.supervised and link.tied_to_gateway and load_task is not None:
                        logger.error("lost the gateway: %s", exc)
                        self._lost_gateway()
                        break
                    logger.warning("%s; retrying in %.1f s", exc, backoff)
                    await self._sleep_unless_stopped(backoff)
                    backoff = min(backoff * 2, self.options.max_backoff_s)
                    continue
                backoff = 0.2
                if load_task is None:
                    load_task = asyncio.create_task(self._load(), name="liftoff-load")
                await self._session(link, welcome)
                if self.options.supervised and link.tied_to_gateway:
                    self._lost_gateway()
                    break
        finally:
            await self._cleanup(load_task)
        return self._exit_code or EXIT_CLEAN

    def _lost_gateway(self) -> None:
        """A supervised reader leaves with its gateway's link: a failure (its gateway restarts it), unless it was
        asked to stop."""
        if not self._stop.is_set() and self._exit_code is None:
            self._exit_code = EXIT_GATEWAY_LOST

    def request_stop(self, reason: str) -> None:
        """Begin a graceful stop (signal handler)."""
        if not self._stop.is_set():
            logger.info("reader %s stopping: %s", self.options.reader_id, reason)
            self._stop_reason = reason
            self._stop.set()

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ---- registration and loading -------------------------------------------------------------------------------

    def _register_frame(self) -> RegisterFrame:
        config = self.options.config
        model_type = self._backend.model_type.value if self._backend else "CAUSAL"
        loras = self._loras()  # once loaded: what it holds now, which runtime changes may have made differ
        info = ReaderInfo(
            consumer_groups=list(config.consumer_group),
            consumer_name=self._consumer_name,
            device=config.device,
            model_name=config.model_name,
            model_type=model_type,
            pids=[os.getpid()],
            loras=lora_names(config.loras) if loras is None else (loras or None),
        )
        return RegisterFrame(
            reader_id=self.options.reader_id,
            info=info,
            config=config.public_dict(),
            heartbeat_interval_ms=self.options.heartbeat_interval_ms,
            loaded=self._loaded,
            capacity=self._backend.capacity if self._backend and self._loaded else 0,
        )

    def _loras(self) -> str | None:
        """The adapters a request may name now, comma-separated ("" for none), once a generative model is loaded
        (they change at runtime: POST /reader/{id}/loras); None before."""
        backend = self._backend
        if not self._loaded or not isinstance(backend, GenerativeBackend):
            return None
        return ",".join(backend.lora_names())

    def _set_progress(self, fraction: float) -> None:
        """Loading progress from the backend (any thread): kept for heartbeats; a bar on a terminal, else logged
        every quarter."""
        if self._tty:
            label = f"reader {self.options.reader_id}: loading {self.options.config.model_name}"
            end = "\n" if fraction >= 1.0 else ""
            sys.stderr.write(f"\r{progress_bar(label, fraction)}{end}")
            sys.stderr.flush()
        elif int(fraction * 4) > int(self._progress * 4):
            logger.info("reader %s: loading %s: %d%%", self.options.reader_id, self.options.config.model_name,
                        round(fraction * 100))  # fmt: skip
        self._progress = fraction

    async def _load(self) -> None:
        config = self.options.config
        try:
            context = BackendContext(self.options.default_batch_size, self.options.repository_path)
            backend = await asyncio.to_thread(create_backend, config, context)
            self._backend = backend
            logger.info("reader %s: loading %s (%s backend)", self.options.reader_id, config.model_name, backend.name)
            await in_own_thread(backend.load, self._set_progress)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("reader %s: loading %s failed: %s", self.options.reader_id, config.model_name, reason)
            if self._link is not None:
                self._link.send([LoadFailedFrame(reason=reason)])
            self._exit_code = EXIT_LOAD_FAILED
            self.request_stop("the model failed to load")
            return
        notes = backend.notes()
        for note in notes:
            logger.warning("reader %s: %s", self.options.reader_id, note)
        self._worker = make_worker(backend, self._emit_threadsafe, self.options.reader_id)
        self._worker.on_crash = self._worker_crashed
        self._worker.start()
        self._loaded = True
        tune_gc()
        logger.info("reader %s: live (capacity %d)", self.options.reader_id, backend.capacity)
        if self._link is not None:
            self._link.send([LoadedFrame(model_type=backend.model_type.value, capacity=backend.capacity, notes=notes)])

    def _worker_crashed(self, exc: BaseException) -> None:
        """The engine or batcher thread died (a bug): exit with an error, so a supervisor restarts the reader."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail, f"the {type(self._worker).__name__} thread crashed: {exc!r}")

    def _fail(self, reason: str) -> None:
        """Stop at once (no drain: nothing in flight would finish) with exit code 1."""
        self._exit_code = 1
        self._failed = True
        self.request_stop(reason)

    def _emit_threadsafe(self, frames: list[Any]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._emit, frames)

    def _emit(self, frames: list[Any]) -> None:
        if self._link is not None:
            self._link.send(frames)
        if self._worker is not None and not self._worker.in_flight:
            self._idle.set()

    # ---- one connection -----------------------------------------------------------------------------------------

    async def _session(self, link: ReaderLink, welcome: WelcomeFrame) -> None:
        self._link = link
        logger.info("reader %s: connected to gateway %s", self.options.reader_id, welcome.gateway_id)
        receiver = asyncio.create_task(self._receive_forever(link))
        beater = asyncio.create_task(self._heartbeat_forever(link, welcome))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set() and not receiver.done():
                await self._drain(link)
        finally:
            for task in (receiver, beater, stopper):
                task.cancel()
            self._link = None
            await link.close()
            if self._worker is not None:
                self._worker.abort_all()

    async def _receive_forever(self, link: ReaderLink) -> None:
        try:
            while True:
                for frame in await link.receive():
                    self._on_frame(frame)
        except LinkClosedError as exc:
            if not self._stop.is_set():
                logger.warning("reader %s: gateway link closed: %s", self.options.reader_id, exc)

    def _on_frame(self, frame: object) -> None:
        if isinstance(frame, RequestFrame) and not self._can_serve(frame):
            return
        if isinstance(frame, RequestFrame) and frame.kind not in _WORKER_KINDS:
            task = asyncio.create_task(self._serve(frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(frame, RequestFrame) and self._worker is not None:
            self._worker.submit(frame)
        elif isinstance(frame, AbortFrame) and self._worker is not None:
            self._worker.abort(frame.request_id)
        elif isinstance(frame, StopFrame):
            self._worker_abort_all()
            self.request_stop(f"the gateway asked: {frame.reason}")

    def _can_serve(self, frame: RequestFrame) -> bool:
        """Whether this reader's model serves the request's kind; if not, the request fails with a 400."""
        if self._backend is None or not self._loaded:
            return True  # not loaded: the gateway does not route to it (and services wait for nothing)
        model_type = self._backend.model_type
        if frame.kind in SERVES.get(model_type, frozenset()):
            return True
        error = InvalidRequestError(f"{NEEDS[frame.kind]}; reader {self.options.reader_id} serves a "
                                    f"{model_type.value} model ({self.options.config.model_name})")  # fmt: skip
        self._emit([error_frame(frame.request_id, error)])
        return False

    async def _serve(self, frame: RequestFrame) -> None:
        if self._backend is None or not self._loaded:
            return
        self._emit([await asyncio.to_thread(services.serve, self._backend, frame)])

    def _worker_abort_all(self) -> None:
        if self._worker is not None:
            self._worker.abort_all()

    async def _heartbeat_forever(self, link: ReaderLink, welcome: WelcomeFrame) -> None:
        period = welcome.heartbeat_interval_ms / 1000.0
        keepalive = min(period, welcome.reader_message_timeout_ms / 3000.0)
        last = 0.0
        reported = ""
        while True:
            busy = bool(self._tasks) or (self._worker is not None and self._worker.in_flight > 0)  # services too
            unhealthy = self._worker.health() if self._worker else ""
            now = monotonic()
            if busy or now - last >= period or unhealthy != reported:  # a change of health is told at once
                last, reported = now, unhealthy
                active = self._worker.in_flight if self._worker else 0
                progress = 1.0 if self._loaded else self._progress
                stats = self._worker.stats() if self._worker else {}
                link.send([HeartbeatFrame(timestamp_ms=now_ms(), active=active, progress=progress, stats=stats,
                                          unhealthy=unhealthy, loras=self._loras())])  # fmt: skip
            await asyncio.sleep(keepalive)

    async def _drain(self, link: ReaderLink) -> None:
        link.send([DrainFrame(reason=self._stop_reason)])
        deadline = monotonic() + self.options.shutdown_timeout_s
        while self._worker is not None and self._worker.in_flight and not self._failed and monotonic() < deadline:
            # Woken by the last frame; polled too, since work that ends without a frame (an abort of nothing)
            # sets nothing.
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(0.1, max(0.0, deadline - monotonic())))

    async def _cleanup(self, load_task: asyncio.Task[None] | None) -> None:
        if load_task is not None and not load_task.done():
            # The load runs on a thread we cannot interrupt; the process exits without waiting for it.
            load_task.cancel()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)
        if self._backend is not None:
            self._backend.close()
