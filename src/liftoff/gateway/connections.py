"""Connection guards of every port: a cap on open connections and a deadline for each request's headers.

uvicorn has neither in a form a server can rely on: its ``limit_concurrency`` answers a plain-text 503 and only
once a request's headers are in, and a client that sends its headers a byte at a time (or connects and sends
nothing) holds its connection, and a file descriptor, forever. So each port's HTTP protocol is uvicorn's own
(httptools) with two additions:

- a connection beyond ``max_connections`` open on the port gets an immediate 503 in the port's own error shape
  and is closed before anything is read;
- a request whose headers are not complete ``header_timeout_s`` after its first byte (or after the connection
  opened, for the first request) gets a 408 and the connection is closed.

Bodies have their own deadline (``body_timeout_s``, in :class:`liftoff.gateway.http.BodyLimitMiddleware`), and an
idle keep-alive connection is closed by uvicorn after ``timeout_keep_alive`` (5 s).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from liftoff.core.errors import LiftoffError, OverloadedError, SlowClientError
from liftoff.gateway.errors import Renderer

_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


def raw_response(status: int, body: bytes) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap and a header deadline (see the module docstring)."""

    max_connections: ClassVar[int] = 1000
    header_timeout_s: ClassVar[float] = 10.0
    refusal: ClassVar[bytes] = b""  # the whole 503 response to a connection over the cap
    too_slow: ClassVar[bytes] = b""  # the whole 408 response to headers that took too long

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(self.refusal)
            transport.close()
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(self.too_slow)
            self.transport.close()


def guarded_protocol(max_connections: int, header_timeout_s: float, render: Renderer) -> type[GuardedHttpProtocol]:
    """The protocol class of one port: its limits, and its refusals rendered in the port's error shape."""

    def response(error: LiftoffError, status: int) -> bytes:
        return raw_response(status, bytes(render(error).body))

    full = OverloadedError(
        f"this port already has {max_connections} open connections (max_connections); try again later"
    )
    slow = SlowClientError(f"the request's headers did not arrive within {header_timeout_s:g} s (header_timeout_s)")
    attributes = {
        "max_connections": max_connections,
        "header_timeout_s": header_timeout_s,
        "refusal": response(full, 503),
        "too_slow": response(slow, 408),
    }
    return type("PortHttpProtocol", (GuardedHttpProtocol,), attributes)
