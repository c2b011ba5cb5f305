"""Self-healing readers: the gateway restarts the reader processes it started when they fail.

A reader fails when its process crashes or is killed, or when the gateway declares it dead (silent with requests in
flight, missed heartbeats) and stops its process. Every exit of a supervised process comes here; its
:class:`~liftoff.management.restarts.RestartBook` decides (``restart_policy``, backoff, crash-loop limit), and the
reader is started again with the same id, configuration and consumer groups: ``/status`` shows it dead (with the
reason and the restart due), then loading, then live. While a restart is pending, its groups buffer their waiting
requests (:meth:`Healer.holds`, asked by the broker and the dispatcher); when the reader stays dead, its groups
behave as before (:meth:`~liftoff.broker.base.GatewayBroker.settle`).

A process whose link is gone but which does not exit by itself (frozen, hung) is stopped after a grace period, and
counts as a failure. On a shared (Redis) broker a reader declared dead usually registers again by itself: its
process is stopped only if it has not within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from liftoff.broker.base import GatewayBroker
from liftoff.config.models import ReaderConfig
from liftoff.core.clock import monotonic, now_ms
from liftoff.core.exits import describe_exit
from liftoff.core.types import ReaderState
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for
from liftoff.management.restarts import RestartBook, RestartLimits
from liftoff.management.supervisor import Supervisor

logger = logging.getLogger(__name__)

# A supervised reader exits right after losing its gateway's link; one still running after this long is stuck.
LOST_GRACE_S = 5.0
# On a shared broker, how long a reader declared dead has to register again before its process is stopped.
SHARED_LOST_GRACE_S = 15.0
# SIGTERM to SIGKILL for a process that is stopped because it is stuck.
STUCK_STOP_GRACE_S = 2.0


@dataclass
class Supervised:
    """A reader whose process this gateway started: its configuration, current pid and restart history."""

    config: ReaderConfig
    book: RestartBook
    pid: int = 0


class Healer:
    """Restarts the readers this gateway started, and says which groups buffer while they come back."""

    def __init__(self, registry: ReaderRegistry, broker: GatewayBroker, supervisor: Supervisor,
                 limits: RestartLimits) -> None:  # fmt: skip
        self.registry = registry
        self.broker = broker
        self.supervisor = supervisor
        self.limits = limits
        self.readers: dict[str, Supervised] = {}
        self._restarts: set[asyncio.Task[None]] = set()  # waiting for a restart to be due, or spawning it
        self._reaps: set[asyncio.Task[None]] = set()  # watching lost readers' processes
        self._stopping = asyncio.Event()

    # ---- the readers it looks after ----------------------------------------------------------------------------

    def adopt(self, reader_id: str, config: ReaderConfig, pid: int) -> None:
        """A reader process was started by ``create``: look after it from now on (a new history)."""
        self.readers[reader_id] = Supervised(config, RestartBook(config.restart_policy, self.limits), pid)

    def reconfigure(self, reader_id: str, config: ReaderConfig) -> None:
        """The reader's configuration changed while it runs (its LoRA adapters): a restart uses the new one."""
        supervised = self.readers.get(reader_id)
        if supervised is not None:
            supervised.config = config

    def forget(self, reader_id: str) -> None:
        """The reader is deleted: never restart it; its groups stop buffering for it."""
        supervised = self.readers.pop(reader_id, None)
        if supervised is not None:
            supervised.book.give_up("the reader was deleted")
            self._settle(supervised.config)

    def failed_to_start(self, reader_id: str, config: ReaderConfig, error: str) -> None:
        """``create`` could not start the process at all: the reader stays dead."""
        self.adopt(reader_id, config, 0)
        self.readers[reader_id].book.give_up(error)

    # ---- events ------------------------------------------------------------------------------------------------

    def on_reader_loaded(self, reader_id: str) -> None:
        """The reader is live."""
        supervised = self.readers.get(reader_id)
        if supervised is not None:
            supervised.book.went_live(monotonic())

    def on_reader_lost(self, reader_id: str) -> None:
        """The reader's link is gone, or it was declared dead: make sure its process goes, so it can restart."""
        supervised = self.readers.get(reader_id)
        if supervised is None:
            return
        supervised.book.lost()
        pid = self.supervisor.pid(reader_id)
        if pid is not None and not self.registry.closing:
            grace = SHARED_LOST_GRACE_S if self.broker.shared else LOST_GRACE_S
            self._spawn_task(self._reaps, self._stop_if_stuck(reader_id, pid, grace), f"liftoff-reap-{reader_id}")

    def on_process_exit(self, reader_id: str, pid: int, code: int) -> None:
        """A reader process exited: restart it later, or leave it dead with the reason."""
        record = self.registry.get(reader_id)
        seen = record.error if record is not None and record.state is ReaderState.DEAD else None
        account = f"{seen}; its process {describe_exit(code)}" if seen else f"the reader process {describe_exit(code)}"
        supervised = self.readers.get(reader_id)
        if supervised is not None and supervised.pid != pid:
            return  # an earlier process of a reader created again since
        if supervised is not None and record is None and code == 0:
            self.forget(reader_id)  # stopped by a gateway that deleted it (one sharing the broker)
            supervised = None
        if supervised is None or self.registry.closing:
            self._dead(reader_id, seen or account)
            return
        delay = supervised.book.exited(code, account, monotonic())
        if delay is None:
            verdict = supervised.book.verdict or account
            logger.error("reader %s stays dead: %s", reader_id, verdict)
            self._dead(reader_id, verdict)
            self._settle(supervised.config)
            return
        logger.warning("reader %s: %s; restarting it in %g s", reader_id, account, delay)
        self._dead(reader_id, f"{account}; restarting in {delay:g} s")
        self._spawn_task(
            self._restarts, self._restart_later(reader_id, supervised, delay), f"liftoff-restart-{reader_id}"
        )

    # ---- restarting --------------------------------------------------------------------------------------------

    async def _restart_later(self, reader_id: str, supervised: Supervised, delay_s: float) -> None:
        """Start the reader's process again after ``delay_s`` (the backoff), unless the gateway stops or the reader
        is deleted first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)
        if self._stopping.is_set() or self.readers.get(reader_id) is not supervised:
            return  # the gateway is shutting down, or the reader was deleted (or created again) meanwhile
        if self.registry.get(reader_id) is None:  # forgotten with the shared broker's registry (Redis was lost)
            config = supervised.config
            self.registry.add(ReaderRecord(reader_id=reader_id, config=config, info=info_for(config), managed=True))
        self.registry.restarting(reader_id)  # loading from now on: nobody else starts it meanwhile
        try:
            pid = await self.supervisor.spawn(reader_id, supervised.config)
        except OSError as exc:
            supervised.book.give_up(f"could not start the reader process again: {exc}")
            self._dead(reader_id, supervised.book.verdict or str(exc))
            self._settle(supervised.config)
            return
        supervised.pid = pid
        supervised.book.restarted(monotonic())
        if self.readers.get(reader_id) is not supervised:
            if self.supervisor.pid(reader_id) == pid:  # deleted while it was being started
                await self.supervisor.stop(reader_id, STUCK_STOP_GRACE_S)
            return
        record = self.registry.get(reader_id)
        if record is not None:
            record.info.pids = [pid]
        logger.info("reader %s restarted (pid %d, restart %d)", reader_id, pid, supervised.book.restarts)

    async def _stop_if_stuck(self, reader_id: str, pid: int, grace_s: float) -> None:
        """Stop a lost reader's process if it has not exited (or, on a shared broker, registered again) in time."""
        if await self.supervisor.wait_exit(reader_id, grace_s) or self.supervisor.pid(reader_id) != pid:
            return
        supervised = self.readers.get(reader_id)
        record = self.registry.get(reader_id)
        if supervised is None or record is None or self.registry.closing:
            return
        if self.broker.shared and record.state is not ReaderState.DEAD:
            return  # it registered again by itself
        logger.warning("reader %s (pid %d) is still running %g s after it was lost; stopping it", reader_id, pid,
                       grace_s)  # fmt: skip
        supervised.book.declared_dead = True
        await self.supervisor.stop(reader_id, STUCK_STOP_GRACE_S, final=False)

    def _dead(self, reader_id: str, reason: str) -> None:
        """Show the reader dead with ``reason`` (the fullest account so far), and out of the broker."""
        self.registry.set_dead(reader_id, reason)
        self.broker.evict_reader(reader_id, reason)

    def _settle(self, config: ReaderConfig) -> None:
        """The reader stays dead: its groups stop buffering for it (their waiting requests may fail now)."""
        for group in config.consumer_group:
            self.broker.settle(group)

    @staticmethod
    def _spawn_task(tasks: set[asyncio.Task[None]], coro: Any, name: str) -> None:
        """Run ``coro`` as a task kept in ``tasks`` until it ends (so that the shutdown can wait for it)."""
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def shutdown(self) -> None:
        """No more restarts: the waiting ones end at once, one already spawning finishes (its process is then
        stopped with the others)."""
        self._stopping.set()
        for task in list(self._restarts):
            await task

    async def join(self) -> None:
        """Wait for the watches of lost readers (once the processes are stopped, they end at once)."""
        for task in list(self._reaps):
            await task

    # ---- questions ---------------------------------------------------------------------------------------------

    def holds(self, group: str) -> bool:
        """Whether ``group`` keeps its waiting requests while no reader of it is live: a reader of it is being
        restarted, or has ``buffer_requests``. A reader that runs but says it cannot serve (an API reader whose
        upstream is down) holds nothing: when it comes back is not known, so its group answers 503 at once."""
        if self.registry.closing:
            return False
        if any(self._holds(reader_id, s) and group in s.config.consumer_group for reader_id, s in self.readers.items()):
            return True
        return self.registry.buffering(group)

    def _holds(self, reader_id: str, supervised: Supervised) -> bool:
        """Whether this reader keeps its groups' waiting requests (see :meth:`holds`)."""
        record = self.registry.get(reader_id)
        return supervised.book.holds() and not (record is not None and record.unhealthy)

    def view(self, reader_id: str) -> dict[str, Any]:
        """The restart fields of ``GET /reader/{id}`` (``restart_policy`` null: not started by this gateway)."""
        supervised = self.readers.get(reader_id)
        if supervised is None:
            return {"restart_policy": None, "restarts": 0, "last_exit": None, "next_restart_ms": None}
        return supervised.book.view(monotonic(), now_ms())

    def restart_counts(self) -> dict[str, int]:
        """Restarts of every reader this gateway looks after (the ``liftoff_reader_restarts_total`` metric)."""
        return {reader_id: s.book.restarts for reader_id, s in self.readers.items()}
