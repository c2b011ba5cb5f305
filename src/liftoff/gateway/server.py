"""The gateway process: serve every port from one event loop, run the readers, shut down in order.

One uvicorn server per port shares one :class:`GatewayState`. Signal handling has one owner (this module), not
each uvicorn server (whose last-installed handler would win). Shutdown: stop accepting on the public ports and
let in-flight requests finish (up to ``shutdown_timeout_s``), then stop the readers, then close the internal
port. A second SIGINT/SIGTERM forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
from collections.abc import Iterator

import uvicorn

from liftoff.broker.base import BrokerSettings, GatewayBroker
from liftoff.broker.embedded import EmbeddedBroker
from liftoff.config.loader import LoadedConfig
from liftoff.config.models import AppConfig
from liftoff.core.ids import new_gateway_id
from liftoff.core.runtime import tune_gc
from liftoff.gateway.apps import PORT_SURFACES, RENDERERS, build_app
from liftoff.gateway.connections import guarded_protocol
from liftoff.gateway.dispatch import Dispatcher
from liftoff.gateway.errors import render_native
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.gateway.state import BrokerEventRouter, GatewayState
from liftoff.logs import RequestLog
from liftoff.management.heartbeats import sweep_forever
from liftoff.management.manager import ReaderManager
from liftoff.management.registry import ReaderRegistry
from liftoff.management.restarts import RestartLimits
from liftoff.management.supervisor import SpawnSettings, Supervisor

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


def make_broker(config: AppConfig, settings: BrokerSettings) -> GatewayBroker:
    """The broker ``config.broker`` names: embedded, or Redis (imported only then)."""
    if config.broker == "embedded":
        return EmbeddedBroker(settings)
    from liftoff.broker.redis_gateway import RedisBroker

    return RedisBroker(settings, config.broker, config.redis_max_memory)


class GatewayStartError(Exception):
    """The gateway could not start (a port is taken, ...)."""


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the gateway."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, key: str) -> socket.socket:
    """Listen on ``host:port``; the error names the config key of the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise GatewayStartError(
            f"cannot listen on {host}:{port} ({key}): {exc.strerror}; stop what uses it or set {key} to another port"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def raise_open_files_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` file descriptors if the hard limit allows (every connection is one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit to %d: %s", target, exc)


class Gateway:
    """A running gateway: its ports, broker, registry, readers."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.config = loaded.server
        self._stop = asyncio.Event()
        self._signals = 0
        self._servers: dict[str, _Server] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.state: GatewayState | None = None
        self.supervisor: Supervisor | None = None

    def _bind_all(self) -> dict[str, socket.socket]:
        sockets: dict[str, socket.socket] = {}
        try:
            for key in AppConfig.port_fields():
                sockets[key] = bind(self.config.host, getattr(self.config, key), key)
        except GatewayStartError:
            for sock in sockets.values():
                sock.close()
            raise
        actual = {key: sock.getsockname()[1] for key, sock in sockets.items()}
        self.config = self.config.model_copy(update=actual)
        return sockets

    def _build_state(self) -> GatewayState:
        config = self.config
        settings = BrokerSettings(
            gateway_id=new_gateway_id(),
            reserved_groups=frozenset(config.reserved_groups()),
            max_queued_requests=config.queue_limit(),
            max_retries=config.max_retries,
            reader_message_timeout_ms=config.reader_message_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
        )
        broker = make_broker(config, settings)
        registry = ReaderRegistry()
        host = "127.0.0.1" if config.host in {"0.0.0.0", "::", ""} else config.host
        spawn = SpawnSettings(
            gateway_address=f"{host}:{config.internal_port}",
            broker=config.broker,
            log_level=config.log_level,
            log_format=config.log_format,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            default_batch_size=config.max_batch_size or DEFAULT_BATCH_SIZE,
            repository_path=config.repository_path,
            shutdown_timeout_s=config.shutdown_timeout_s,
        )
        manager_ref: list[ReaderManager] = []
        self.supervisor = Supervisor(spawn, lambda rid, pid, code: manager_ref[0].on_process_exit(rid, pid, code))
        limits = RestartLimits(max_restarts=config.reader_max_restarts, window_s=config.reader_restart_window_s)
        manager = ReaderManager(registry, broker, self.supervisor, self.loaded.path, config.shutdown_timeout_s, limits)
        manager_ref.append(manager)
        broker.holding = manager.healer.holds
        metrics = GatewayMetrics(registry, broker, manager.healer.restart_counts) if config.enable_metrics else None
        dispatcher = Dispatcher(broker, registry, config, metrics)
        if metrics is not None:
            broker.queue_time_observer = metrics.observe_queue_time
        broker.bind(BrokerEventRouter(dispatcher, registry, manager))
        request_log = RequestLog(config.log_format) if config.log_requests and RequestLog.enabled() else None
        return GatewayState(config, registry, broker, dispatcher, manager, metrics, request_log)

    def _serve(self, key: str, sock: socket.socket, state: GatewayState) -> None:
        limits = self.config
        http = guarded_protocol(limits.max_connections, limits.header_timeout_s, RENDERERS.get(key, render_native))
        config = uvicorn.Config(
            build_app(key, state),
            http=http,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, round(self.config.shutdown_timeout_s)),
            ws_max_size=64 * 1024 * 1024,
            server_header=False,
        )
        server = _Server(config)
        self._servers[key] = server
        self._tasks[key] = asyncio.create_task(server.serve(sockets=[sock]), name=f"liftoff-serve-{key}")

    def request_stop(self) -> None:
        """First call: graceful shutdown. Second call: forced."""
        self._signals += 1
        if self._signals == 1:
            logger.info("shutting down: finishing in-flight requests (up to %.0f s)", self.config.shutdown_timeout_s)
            self._stop.set()
        else:
            logger.warning("forced shutdown")
            for server in self._servers.values():
                server.force_exit = True
                server.should_exit = True
            if self.supervisor is not None:
                self.supervisor.kill_all()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        raise_open_files_limit(7 * self.config.max_connections + 1024)
        sockets = self._bind_all()
        state = self.state = self._build_state()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await state.broker.start()
        for key, sock in sockets.items():
            self._serve(key, sock, state)
        sweeper = asyncio.create_task(
            sweep_forever(state.registry, self.config.heartbeat_check_interval, state.broker.evict_reader)
        )
        for reader_id, reader_config in self.loaded.readers.items():
            await state.manager.create(reader_config, reader_id, persist=False)
        self._log_started()
        tune_gc()
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait([stopper, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if self._stop.is_set() else 1
        if code:
            logger.error("a server stopped unexpectedly; shutting down")
        await self._shutdown(state, sweeper)
        return code

    def _log_started(self) -> None:
        config = self.config
        ports = ", ".join(f"{PORT_SURFACES[key][0]} {getattr(config, key)}" for key in AppConfig.port_fields())
        readers = ", ".join(self.loaded.readers) or "none (add them with POST /reader)"
        logger.info("Liftoff listening on %s: %s; readers: %s", config.host, ports, readers)
        for warning in self.loaded.warnings:
            logger.warning("%s", warning)

    async def _shutdown(self, state: GatewayState, sweeper: asyncio.Task[None]) -> None:
        state.dispatcher.closing = True
        public = [key for key in self._servers if key != "internal_port"]
        for key in public:
            self._servers[key].should_exit = True
        await asyncio.gather(*(self._tasks[key] for key in public), return_exceptions=True)
        await state.manager.shutdown()
        sweeper.cancel()
        self._servers["internal_port"].should_exit = True
        await asyncio.gather(self._tasks["internal_port"], return_exceptions=True)
        await state.broker.close()
        if state.request_log is not None:
            state.request_log.flush()
        logger.info("Liftoff stopped")
