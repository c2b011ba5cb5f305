"""Connection guards of every port: a cap on open connections and deadlines for each request's headers and body.

uvicorn has neither in a form a server can rely on: its ``limit_concurrency`` answers a plain-text 503 and only
once a request's headers are in, and a client that sends its headers or its body a byte at a time (or connects and
sends nothing) holds its connection, a file descriptor and a handler, forever. So each port's HTTP protocol is
uvicorn's own (httptools) with two additions:

- a connection beyond ``max_connections`` open on the port gets an immediate 503 in the port's own error shape
  and is closed before anything is read;
- a request whose headers are not complete ``header_timeout_s`` after its first byte (or after the connection
  opened, for the first request), or whose body is not complete ``body_timeout_s`` after its headers, gets a 408
  and the connection is closed.

The deadlines cost no timer per request: each connection has at most one timer, which moves a deadline along
when it fires (the request has moved on meanwhile) instead of being cancelled and armed again at every step, so a
busy keep-alive connection pays for an attribute or two. An idle keep-alive connection is closed by uvicorn after
``timeout_keep_alive`` (5 s).
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
    """uvicorn's httptools protocol with a connection cap and header and body deadlines (see the module docstring)."""

    max_connections: ClassVar[int] = 1000
    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 60.0
    refusal: ClassVar[bytes] = b""  # the whole 503 response to a connection over the cap
    slow_headers: ClassVar[bytes] = b""  # the whole 408 response to headers that took too long
    slow_body: ClassVar[bytes] = b""  # the whole 408 response to a body that took too long

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for: bytes | None = None  # the answer if what is awaited does not come: None when nothing is
        self._deadline = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(self.refusal)
            transport.close()
            return
        self._await(self.slow_headers, self.header_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await(self.slow_headers, self.header_timeout_s)

    def on_headers_complete(self) -> None:
        upgrade = self.parser.should_upgrade()  # a WebSocket: the connection is no longer an HTTP one
        self._waiting_for = None
        if not upgrade:
            self._await(self.slow_body, self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._waiting_for = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_for = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _await(self, answer: bytes, within_s: float) -> None:
        """Expect the next part of the request within ``within_s``; else ``answer`` it and close."""
        self._waiting_for = answer
        self._deadline = self.loop.time() + within_s
        if self._timer is not None and self._timer.when() > self._deadline:  # it waits for a later deadline
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        answer = self._waiting_for
        if answer is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:  # the request moved on since the timer was set: follow it
            self._timer = self.loop.call_at(self._deadline, self._check)
            return
        self._waiting_for = None
        self.transport.write(answer)
        self.transport.close()


def guarded_protocol(
    max_connections: int, header_timeout_s: float, body_timeout_s: float, render: Renderer
) -> type[GuardedHttpProtocol]:
    """The protocol class of one port: its limits, and its refusals rendered in the port's error shape."""

    def response(error: LiftoffError, status: int) -> bytes:
        return raw_response(status, bytes(render(error).body))

    full = OverloadedError(
        f"this port already has {max_connections} open connections (max_connections); try again later"
    )
    headers = SlowClientError(f"the request's headers did not arrive within {header_timeout_s:g} s (header_timeout_s)")
    body = SlowClientError(f"the request's body did not arrive within {body_timeout_s:g} s (body_timeout_s)")
    attributes = {
        "max_connections": max_connections,
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
        "refusal": response(full, 503),
        "slow_headers": response(headers, 408),
        "slow_body": response(body, 408),
    }
    return type("PortHttpProtocol", (GuardedHttpProtocol,), attributes)
