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

from liftoff.broker.base import BrokerSettings
from liftoff.broker.factory import gateway_broker
from liftoff.config.access import is_loopback
from liftoff.config.loader import LoadedConfig
from liftoff.config.models import AppConfig
from liftoff.core.ids import new_gateway_id
from liftoff.core.runtime import tune_gc
from liftoff.gateway.accounting import Accounting
from liftoff.gateway.apps import PORT_SURFACES, RENDERERS, build_app
from liftoff.gateway.connections import guarded_protocol
from liftoff.gateway.dispatch import Dispatcher
from liftoff.gateway.errors import render_native
from liftoff.gateway.hosts import HostNames
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.gateway.state import BrokerEventRouter, GatewayState
from liftoff.logs import RequestLog
from liftoff.management.heartbeats import sweep_forever
from liftoff.management.manager import ReaderManager
from liftoff.management.policy import ReaderLimits
from liftoff.management.prune import PruneAfter, prune_forever
from liftoff.management.registry import ReaderRegistry
from liftoff.management.restarts import RestartLimits
from liftoff.management.supervisor import SpawnSettings, Supervisor

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


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
        self._names: HostNames | None = None

    def _check_exposure(self) -> None:
        """Refuse to start with the management or internal port open beyond loopback without its key."""
        errors, warnings = self.config.exposure()
        if errors:
            raise GatewayStartError("refusing to start: " + "; ".join(errors))
        for warning in warnings:
            logger.warning("%s", warning)

    def _bind_all(self) -> dict[str, socket.socket]:
        self._check_exposure()
        sockets: dict[str, socket.socket] = {}
        try:
            for key in AppConfig.port_fields():
                sockets[key] = bind(self.config.bind_host(key), getattr(self.config, key), key)
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
        broker = gateway_broker(config, settings)
        registry = ReaderRegistry()
        host = "127.0.0.1" if config.internal_host in {"0.0.0.0", "::", ""} else config.internal_host
        spawn = SpawnSettings(
            gateway_address=f"[{host}]:{config.internal_port}" if ":" in host else f"{host}:{config.internal_port}",
            broker=config.broker,
            log_level=config.log_level,
            log_format=config.log_format,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            default_batch_size=config.max_batch_size or DEFAULT_BATCH_SIZE,
            repository_path=config.repository_path,
            shutdown_timeout_s=config.shutdown_timeout_s,
            reader_secret=config.reader_secret,
            allow_downloads=config.allow_downloads,
        )
        manager_ref: list[ReaderManager] = []
        self.supervisor = Supervisor(spawn, lambda rid, pid, code: manager_ref[0].on_process_exit(rid, pid, code))
        limits = RestartLimits(max_restarts=config.reader_max_restarts, window_s=config.reader_restart_window_s)
        manager = ReaderManager(registry, broker, self.supervisor, self.loaded.path, config.shutdown_timeout_s, limits,
                                ReaderLimits.of(config))  # fmt: skip
        manager_ref.append(manager)
        broker.holding = manager.healer.holds
        metrics = GatewayMetrics(registry, broker, manager.healer.restart_counts) if config.enable_metrics else None
        dispatcher = Dispatcher(broker, registry, config, Accounting(metrics))
        if metrics is not None:
            broker.queue_time_observer = metrics.observe_queue_time
        broker.bind(BrokerEventRouter(dispatcher, registry, manager))
        request_log = RequestLog(config.log_format) if config.log_requests and RequestLog.enabled() else None
        return GatewayState(config, registry, broker, dispatcher, manager, metrics, request_log)

    def _serve(self, key: str, sock: socket.socket, state: GatewayState) -> None:
        limits = self.config
        render = RENDERERS.get(key, render_native)
        http = guarded_protocol(limits.max_connections, limits.header_timeout_s, limits.body_timeout_s, render)
        self._names = self._names or HostNames.of(self.config)
        config = uvicorn.Config(
            build_app(key, state, self._names),
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
        after = PruneAfter(self.config.dead_reader_retention_s, self.config.reader_load_timeout_s)
        pruner = asyncio.create_task(
            prune_forever(state.registry, after, state.manager.forget_dead, state.broker.stop_reader)
        )
        for reader_id, reader_config in self.loaded.readers.items():
            await state.manager.create(reader_config, reader_id)
        self._log_started()
        tune_gc()
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait([stopper, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED)
        code = 0 if self._stop.is_set() else 1
        if code:
            logger.error("a server stopped unexpectedly; shutting down")
        pruner.cancel()
        await self._shutdown(state, sweeper)
        return code

    def _log_started(self) -> None:
        config = self.config
        ports = ", ".join(f"{PORT_SURFACES[key][0]} {config.bind_host(key)}:{getattr(config, key)}"
                          for key in AppConfig.port_fields())  # fmt: skip
        readers = ", ".join(self.loaded.readers) or "none (add them with POST /reader)"
        logger.info("Liftoff listening: %s; readers: %s", ports, readers)
        keys = {"inference": bool(config.api_keys), "management": bool(config.management_api_keys),
                "internal": config.reader_secret is not None}  # fmt: skip
        logger.info("keys required: %s", ", ".join(f"{port} {'yes' if on else 'no'}" for port, on in keys.items()))
        if not config.api_keys and not is_loopback(config.host):
            logger.info("the inference ports are open to whoever reaches %s (no api_keys, as Takeoff)", config.host)
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
