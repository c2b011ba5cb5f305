"""Per-request observation at the edge of every port: request ids, HTTP metrics and one log line per request.

:class:`ObserveMiddleware` wraps each port's app, outermost. It takes the client's ``X-Request-Id`` (or makes one),
returns it in the response headers (a made one is this process's random prefix and a counter: no system
call), counts the request in ``http_pre_handler_requests_total`` as it arrives and in
``http_requests_total``/``http_requests_duration_seconds`` when its last byte is sent (a stream's end), and logs one
line: request id, method, path, status, duration, and what the dispatcher learnt on the way (consumer group,
reader, token counts, time to first token) through the :class:`RequestRecord` it keeps in a context variable.
Paths are labelled by their route template (``/tokenize/{reader_id}``), so labels stay few.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liftoff.core.ids import new_request_id
from liftoff.gateway.asgi import header
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.logs import RequestLog

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
_MAX_PATHS = 1024


@dataclass(slots=True)
class RequestRecord:
    """What one HTTP request did, filled in as it goes (the log line's fields)."""

    request_id: str
    method: str = ""
    path: str = ""
    status: int = 0
    ms: float = 0.0
    consumer_group: str = ""
    reader_id: str = ""
    prompts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: float | None = None

    def line_fields(self) -> dict[str, Any]:
        """Every field of the request's log line."""
        head = {"request_id": self.request_id, "method": self.method, "path": self.path, "status": self.status,
                "ms": round(self.ms, 2)}  # fmt: skip
        return head | self.fields()

    def fields(self) -> dict[str, Any]:
        """The non-empty fields the dispatcher filled in."""
        found: dict[str, Any] = {
            "consumer_group": self.consumer_group,
            "reader_id": self.reader_id,
            "prompts": self.prompts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": self.first_token_ms,
        }
        return {key: value for key, value in found.items() if value}


current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("liftoff_request", default=None)


class PathNames:
    """Route templates of an app's paths (``/tokenize/abc`` → ``/tokenize/{reader_id}``), cached."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self._patterns: list[tuple[re.Pattern[str], str]] = list(_templates(routes))
        self._cache: dict[str, str] = {}

    def name(self, path: str) -> str:
        """The template matching ``path``; ``unmatched`` for a path no route serves."""
        found = self._cache.get(path)
        if found is None:
            found = next((template for regex, template in self._patterns if regex.match(path)), "unmatched")
            if len(self._cache) < _MAX_PATHS:
                self._cache[path] = found
        return found


def _templates(routes: list[Any]) -> Iterator[tuple[re.Pattern[str], str]]:
    """(regex, template) of every route, looking into included routers (FastAPI keeps them whole)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _templates(list(included.routes))
        elif hasattr(route, "path_regex") and hasattr(route, "path"):
            yield route.path_regex, str(route.path)


def _request_id(scope: Scope) -> str:
    """The client's request id when it is a valid one, else a new one."""
    given = header(scope, REQUEST_ID_HEADER)
    return given.decode() if given is not None and _VALID_ID.fullmatch(given) else new_request_id()


class ObserveMiddleware:
    """Request ids, HTTP metrics and request log lines for one port's app."""

    def __init__(self, app: ASGIApp, *, port: int, paths: PathNames, metrics: GatewayMetrics | None,
                 request_log: RequestLog | None) -> None:  # fmt: skip
        self.app = app
        self.port = str(port)
        self.paths = paths
        self.metrics = metrics
        self.request_log = request_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord(_request_id(scope))
        path = self.paths.name(scope["path"])
        if self.metrics is not None:
            self.metrics.http_pre_handler[(self.port, path)] += 1
        status = 0
        header = (REQUEST_ID_HEADER, record.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current_request.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request.reset(token)
            self._finish(scope, path, status, time.perf_counter() - started, record)

    def _finish(self, scope: Scope, path: str, status: int, seconds: float, record: RequestRecord) -> None:
        method = scope.get("method", "")
        if self.metrics is not None:
            self.metrics.http_requests[(self.port, path, method, str(status or 499))] += 1
            self.metrics.http_duration.observe((self.port, path), seconds)
        if self.request_log is not None:
            record.method, record.path, record.status, record.ms = method, scope["path"], status or 499, seconds * 1000
            self.request_log.write(record.line_fields)
