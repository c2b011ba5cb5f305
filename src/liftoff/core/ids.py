"""Identifiers for requests, readers and gateways."""

from __future__ import annotations

import itertools
import os
import socket
import uuid

_counter = itertools.count()
_prefix = uuid.uuid4().hex[:12]


def new_request_id() -> str:
    """A request id unique across gateways: a per-process random prefix and a counter."""
    return f"{_prefix}-{next(_counter):x}"


def new_reader_id() -> str:
    """A reader id for readers created at runtime (a uuid4, as Takeoff does)."""
    return str(uuid.uuid4())


def new_gateway_id() -> str:
    """A gateway id, used to name reply channels."""
    return f"gw-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def consumer_name(reader_id: str) -> str:
    """The name a reader uses inside its consumer groups: unique per process."""
    return f"{reader_id}@{socket.gethostname()}:{os.getpid()}"
