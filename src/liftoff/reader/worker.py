"""What the reader's two worker threads share: a thread of their own fed through a thread-safe inbox.

The engine (generation, continuous batching) and the batcher (encoders, dynamic batching) take requests, aborts
and the stop signal from the reader's event loop through :class:`InboxWorker`'s methods, and apply them on their
thread between steps or batches (:meth:`InboxWorker._apply`), so the backend is only ever used from one thread.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
from collections.abc import Callable

from liftoff.core.frames import RequestFrame

logger = logging.getLogger(__name__)

STOP = object()  # inbox command: leave the thread's loop
ABORT_ALL = object()  # inbox command: cancel every request


class InboxWorker(abc.ABC):
    """A thread that owns a backend and takes its commands from an inbox."""

    def __init__(self, name: str) -> None:
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._running = False
        self.on_crash: Callable[[BaseException], None] | None = None  # told when the thread dies of an exception

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Requests taken and not finished (read from another thread: approximate)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Running totals since start, for the heartbeats (read from another thread)."""

    def health(self) -> str:
        """Why the worker cannot serve now, for the heartbeats ("" when it can; only a relay's upstream fails)."""
        return ""

    def start(self) -> None:
        """Start the thread."""
        self._running = True
        self._thread.start()

    def submit(self, frame: RequestFrame) -> None:
        """Queue a request."""
        self._inbox.put(frame)

    def abort(self, request_id: str) -> None:
        """Cancel a request, waiting or running."""
        self._inbox.put(request_id)

    def abort_all(self) -> None:
        """Cancel every request (the gateway connection was lost)."""
        self._inbox.put(ABORT_ALL)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; what it was working on is dropped."""
        if self._running:
            self._inbox.put(STOP)
            self._thread.join(timeout)
            self._running = False

    def _apply_all(self, first: object) -> bool:
        """Apply ``first`` and every command queued behind it; False when one of them is the stop signal."""
        command = first
        while True:
            if command is STOP or not self._apply(command):
                return False
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: object) -> bool:
        """Apply one command: a request, an abort (a request id) or :data:`ABORT_ALL`."""
        if isinstance(command, RequestFrame):
            self._accept(command)
        elif isinstance(command, str):
            self._cancel(command)
        elif command is ABORT_ALL:
            self._cancel_all()
        return True

    def _main(self) -> None:
        """Run the loop; if a bug kills it, say so instead of leaving a reader that looks live but serves nothing
        (the reader process then exits, and the gateway's supervisor restarts it)."""
        try:
            self._run()
        except BaseException as exc:
            logger.exception("the %s thread crashed", self._thread.name)
            if self.on_crash is not None:
                self.on_crash(exc)

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread's loop."""

    @abc.abstractmethod
    def _accept(self, frame: RequestFrame) -> None:
        """Take a request."""

    @abc.abstractmethod
    def _cancel(self, request_id: str) -> None:
        """Drop a request."""

    @abc.abstractmethod
    def _cancel_all(self) -> None:
        """Drop every request."""
