"""Logging setup for the gateway and reader processes: text or JSON lines on stderr."""

from __future__ import annotations

import logging
import sys
import time

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


def setup_logging(level: str = "INFO", fmt: str = "text", role: str = "gateway") -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{role}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = max(logging.WARNING, root.level)
    for name in ("websockets", "uvicorn.error"):
        logging.getLogger(name).setLevel(quiet if root.level > logging.DEBUG else root.level)
