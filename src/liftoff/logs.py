"""Logging setup for the gateway and reader processes: text or JSON lines on stderr.

Request lines (logger ``liftoff.requests``, one per HTTP request) are many: they go to stderr through a buffer that
a background thread flushes every 0.2 s (and at exit), instead of one write per line, which cost the gateway a
third of its throughput on small requests. They may thus appear up to 0.2 s after other lines logged later.
"""

from __future__ import annotations

import atexit
import io
import logging
import sys
import threading
import time
from typing import IO

import msgspec


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process role, message (and the exception, if any)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # structured fields of a request line (liftoff.gateway.observe)
            body.update(fields)
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(body).decode()


REQUEST_LOGGER = "liftoff.requests"
FLUSH_EVERY_S = 0.2


class BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose writes are flushed by a timer thread, not after every record."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._closed = threading.Event()
        threading.Thread(target=self._flush_forever, name="liftoff-log-flush", daemon=True).start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)

    def _flush_forever(self) -> None:
        while not self._closed.wait(FLUSH_EVERY_S):
            self.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()


def _formatter(fmt: str, role: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(role)
    return logging.Formatter(f"%(asctime)s %(levelname)-7s [{role}] %(name)s: %(message)s")


def _buffered_stderr() -> IO[str]:
    try:
        raw = open(sys.stderr.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, tests): write through
        return sys.stderr
    return io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="replace", write_through=False)


def setup_logging(level: str = "INFO", fmt: str = "text", role: str = "gateway") -> None:
    """Configure the root logger once for this process (and the buffered request log, see the module doc).

    Log records skip what no Liftoff format prints: the caller's file and line (a stack walk), thread, process
    and process name (system calls): together they were most of the cost of a request line.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented knob: no findCaller()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt, role))
    requests = logging.getLogger(REQUEST_LOGGER)
    for old in requests.handlers:
        old.close()
    buffered = BufferedHandler(_buffered_stderr())
    buffered.setFormatter(_formatter(fmt, role))
    requests.handlers[:] = [buffered]
    requests.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = max(logging.WARNING, root.level)
    for name in ("websockets", "uvicorn.error"):
        logging.getLogger(name).setLevel(quiet if root.level > logging.DEBUG else root.level)
