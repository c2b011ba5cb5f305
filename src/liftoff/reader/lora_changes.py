"""Adding and removing LoRA adapters on a running reader (``POST`` and ``DELETE /reader/{id}/loras``).

An adapter is found and read by :meth:`GenerativeBackend.load_lora` on a short-lived thread of its own: that may
take seconds (a large file, the hub), and on the engine thread it would hold every running stream. The thread ends
when the adapter is read (torch's thread pool belongs to the thread that first computes with it: a thread that
stayed would slow every step of the engine, see :mod:`liftoff.reader.process`). The engine then installs it
between steps (:meth:`GenerativeBackend.install_lora`, cheap), and answers with the adapters the reader holds.
Removing is cheap and runs on the engine thread at once: new requests naming the adapter are refused from then on,
and those already running under it finish under it.

Every change has a deadline (the payload's ``timeout_s``, the gateway's ``lora_load_timeout_s``): an adapter still
loading then fails with a 400 and is never installed, even if its reading ends later, so the gateway's answer is
the truth. A change the gateway abandons (its client left) is dropped the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from liftoff.backends.base import GenerativeBackend
from liftoff.core.clock import monotonic
from liftoff.core.errors import BackendError, InvalidRequestError, LiftoffError
from liftoff.core.frames import RequestFrame, ResultFrame, error_frame
from liftoff.core.types import RequestKind

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0  # when a change names none (the gateway always does)

Emit = Callable[[list[Any]], None]


@dataclass(frozen=True, slots=True)
class LoraLoaded:
    """Inbox command: an adapter's reading ended (``error`` None when it succeeded)."""

    request_id: str
    loaded: object
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class _Loading:
    """An adapter being read for a change that waits for it."""

    name: str
    deadline: float
    timeout_s: float


class LoraChanges:
    """The adapter changes of one engine: ``accept`` and ``on_loaded`` run on the engine thread."""

    def __init__(self, backend: GenerativeBackend, emit: Emit, post: Callable[[object], None]) -> None:
        self._backend = backend
        self._emit = emit
        self._post = post  # into the engine's inbox, from the reading thread
        self.pending: dict[str, _Loading] = {}

    def accept(self, frame: RequestFrame) -> None:
        """Start a change: read an adapter on its own thread, or remove one now."""
        name = str(frame.payload.get("name", ""))
        if frame.kind is RequestKind.REMOVE_LORA:
            if self._answer(frame.request_id, lambda: self._backend.remove_lora(name)):
                logger.info("LoRA adapter %r removed; requests running under it finish under it", name)
            return
        source = str(frame.payload.get("source", ""))
        timeout_s = float(frame.payload.get("timeout_s") or DEFAULT_TIMEOUT_S)
        self.pending[frame.request_id] = _Loading(name, monotonic() + timeout_s, timeout_s)
        thread = threading.Thread(target=self._read, args=(frame.request_id, name, source), daemon=True,
                                  name="liftoff-lora-load")  # fmt: skip
        thread.start()

    def _read(self, request_id: str, name: str, source: str) -> None:
        """The reading thread: load the adapter and hand it to the engine."""
        try:
            loaded = self._backend.load_lora(name, source)
        except BaseException as exc:  # handed to the change, which fails alone
            self._post(LoraLoaded(request_id, None, exc))
        else:
            self._post(LoraLoaded(request_id, loaded, None))

    def on_loaded(self, done: LoraLoaded) -> None:
        """An adapter was read: install it between steps, unless its change expired or was abandoned."""
        entry = self.pending.pop(done.request_id, None)
        if entry is None:
            logger.info("a LoRA adapter was read after its change ended; it is not installed")
            return
        if done.error is not None:
            error = done.error
            if not isinstance(error, LiftoffError):
                error = BackendError(f"loading LoRA {entry.name!r} failed: {type(error).__name__}: {error}")
            self._emit([error_frame(done.request_id, error)])
            return
        if self._answer(done.request_id, lambda: self._backend.install_lora(done.loaded)):
            logger.info("LoRA adapter %r installed", entry.name)

    def _answer(self, request_id: str, change: Callable[[], None]) -> bool:
        """Apply ``change`` and answer with the adapters the reader holds, or with its error; whether it was made."""
        try:
            change()
        except LiftoffError as exc:
            self._emit([error_frame(request_id, exc)])
            return False
        except Exception as exc:
            logger.exception("a LoRA change failed")
            self._emit([error_frame(request_id, BackendError(f"the LoRA change failed: {exc}"))])
            return False
        self._emit([ResultFrame(request_id=request_id, seq=0, data={"loras": self._backend.lora_names()})])
        return True

    def expire(self) -> None:
        """Fail the changes whose adapter is still being read past their deadline."""
        now = monotonic()
        for request_id, entry in [(rid, entry) for rid, entry in self.pending.items() if entry.deadline <= now]:
            del self.pending[request_id]
            error = InvalidRequestError(
                f"LoRA {entry.name!r} took longer than {entry.timeout_s:g} s to load (the gateway's "
                "lora_load_timeout_s) and was not installed: raise the limit, or put the adapter's files on a "
                "faster disk"
            )
            self._emit([error_frame(request_id, error)])

    def next_deadline(self) -> float | None:
        """The soonest deadline of a pending change."""
        return min((entry.deadline for entry in self.pending.values()), default=None)

    def cancel(self, request_id: str) -> bool:
        """Drop a pending change (its adapter will not be installed); whether there was one."""
        return self.pending.pop(request_id, None) is not None

    def cancel_all(self) -> None:
        """Drop every pending change."""
        self.pending.clear()
