"""Logging setup for the gateway and reader processes: text or JSON lines on stderr.

Request lines (logger ``liftoff.requests``, one per HTTP request) are many: :class:`RequestLog` formats them itself
and writes them to stderr through a buffer that the event loop flushes every 0.2 s (and at exit), instead of going
through a log record, a handler and a write per line, which cost the gateway 40 % of its throughput on small
requests. They may thus appear up to 0.2 s after other lines logged later. Their level is the
``liftoff.requests`` logger's (INFO unless the log level is higher).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

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
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(body).decode()


REQUEST_LOGGER = "liftoff.requests"
FLUSH_EVERY_S = 0.2


# Control characters (a newline above all) in a logged value would let a client forge log lines: escaped.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
_STRUCTURE = re.compile('[ "=]')  # what would end a key=value field early
MAX_FIELD_CHARS = 200  # a logged request field (a consumer group name, say) is cut to this


def escape(text: str) -> str:
    """``text`` with its control characters escaped, so it stays on its line."""
    return text.translate(_CONTROL)


def field_text(value: object) -> str:
    """A request-log value as ``key=value`` text: cut to ``MAX_FIELD_CHARS``, quoted (JSON) when it holds spaces,
    quotes or control characters, so a client's value can neither forge a line nor a field."""
    if not isinstance(value, str):
        return str(value)
    if len(value) > MAX_FIELD_CHARS:
        value = value[:MAX_FIELD_CHARS] + "..."
    if value and value.isprintable() and _STRUCTURE.search(value) is None:
        return value
    return msgspec.json.encode(value).decode()


class TextFormatter(logging.Formatter):
    """Liftoff's text lines; the message's control characters are escaped (the traceback after it is not)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)


def _formatter(fmt: str, role: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(role)
    return TextFormatter(f"%(asctime)s %(levelname)-7s [{role}] %(name)s: %(message)s")


def _buffered_stderr() -> IO[str]:
    try:
        raw = open(sys.stderr.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115 (lives as long as the process)
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, tests): write through
        return sys.stderr
    return io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="replace", write_through=False)


class RequestLog:
    """The gateway's request lines (logger ``liftoff.requests``), formatted like every other line but written
    straight to a buffered stderr, flushed by the event loop within ``FLUSH_EVERY_S`` (see the module doc).

    Used from the event loop thread only.
    """

    def __init__(self, fmt: str = "text", role: str = "gateway", stream: IO[str] | None = None) -> None:
        self._json = fmt == "json"
        self._head = f" INFO    [{role}] {REQUEST_LOGGER}: request "
        self._role = role
        self._stream = stream if stream is not None else _buffered_stderr()
        self._second = -1
        self._stamp = ""
        self._flush_due: asyncio.TimerHandle | None = None
        self._pending: list[tuple[float, Callable[[], dict[str, Any]]]] = []
        atexit.register(self.flush)

    @staticmethod
    def enabled() -> bool:
        """Whether request lines pass the log level."""
        return logging.getLogger(REQUEST_LOGGER).isEnabledFor(logging.INFO)

    def write(self, fields: Callable[[], dict[str, Any]]) -> None:
        """One request line of the fields ``fields()`` returns (``key=value`` pairs, or JSON keys); they are made,
        formatted and written within ``FLUSH_EVERY_S``, together with the others of that time."""
        self._pending.append((time.time(), fields))
        if self._flush_due is None:
            try:
                self._flush_due = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self.flush)
            except RuntimeError:  # no event loop: write through
                self.flush()

    def _line(self, now: float, make: Callable[[], dict[str, Any]]) -> str:
        fields = make()
        second = int(now)
        millis = int((now - second) * 1000)
        if self._json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{millis:03d}Z"
            head = {"ts": stamp, "level": "INFO", "logger": REQUEST_LOGGER, "role": self._role, "msg": "request"}
            line = msgspec.json.encode(head | fields).decode()
        else:
            if second != self._second:
                self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = f"{self._stamp},{millis:03d}{self._head}" + " ".join(
                f"{k}={field_text(v)}" for k, v in fields.items()
            )
        return line + "\n"

    def flush(self) -> None:
        """Format and write out every pending line."""
        self._flush_due = None
        pending, self._pending = self._pending, []
        with contextlib.suppress(OSError, ValueError):
            self._stream.write("".join(self._line(now, fields) for now, fields in pending))
            self._stream.flush()


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = max(logging.WARNING, root.level)
    for name in ("websockets", "uvicorn.error"):
        logging.getLogger(name).setLevel(quiet if root.level > logging.DEBUG else root.level)
