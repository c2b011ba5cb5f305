"""An engine's preparation thread: slow work a request needs before it joins the batch (compiling its grammar).

On the engine thread such work would hold every running stream of the reader (a schema with long bounded strings
compiles for seconds). Here it runs beside the batch, one request at a time and in arrival order; the engine
admits the request when it is done and fails it when it takes longer than its budget. A request cancelled before
its turn (client gone, deadline) is skipped. Work that has started cannot be interrupted (xgrammar has no way to):
it finishes in the background, bounded by the reader's grammar limits, and its result is kept in the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from liftoff.backends.base import Preparation

logger = logging.getLogger(__name__)

Done = Callable[[str, BaseException | None], None]
ANNOUNCE_S = 0.05  # what a preparation that holds the process waits, for its announcement to go out


class Preparer:
    """Runs :class:`Preparation` s on a thread of its own (started on first use); tells ``done`` of each."""

    def __init__(self, done: Done) -> None:
        self._done = done
        self._queue: queue.SimpleQueue[tuple[str, Preparation] | None] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, request_id: str, preparation: Preparation) -> None:
        """Queue a request's preparation."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="liftoff-prepare", daemon=True)
            self._thread.start()
        self._queue.put((request_id, preparation))

    def cancel(self, request_id: str) -> None:
        """Skip a request's preparation if it has not started (its result no longer matters either way)."""
        with self._lock:
            self._cancelled.add(request_id)

    def stop(self) -> None:
        """Let the thread end after what it is doing (it is a daemon: a long compile does not hold the exit)."""
        if self._thread is not None:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request_id, preparation = item
            with self._lock:
                if request_id in self._cancelled:
                    self._cancelled.discard(request_id)
                    continue
            if preparation.quiet_s:
                time.sleep(ANNOUNCE_S)  # the engine announced the silence: let the reader's link send it first
            error: BaseException | None = None
            try:
                preparation.run()
            except Exception as exc:  # reported to the request, which fails alone
                error = exc
            with self._lock:
                self._cancelled.discard(request_id)
            self._done(request_id, error)
