"""HTTP helpers shared by the surfaces: body parsing, the body-size limit, disconnect detection, SSE output.

Cancellation: while a request waits for its readers, a watcher listens for the client's ``http.disconnect`` and
cancels the request's collector; the surface then aborts the request at the reader.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liftoff.core.errors import LiftoffError, PayloadTooLargeError
from liftoff.gateway.asgi import header
from liftoff.gateway.dispatch import Collector
from liftoff.gateway.errors import Renderer, from_validation_error

M = TypeVar("M", bound=BaseModel)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # fmt: skip


def json_body(model: type[BaseModel]) -> dict[str, object]:
    """``openapi_extra`` documenting a JSON body that a handler parses itself (with :func:`read_model`)."""
    schema = inline_definitions(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``#/$defs/...`` reference replaced by its definition: inside an OpenAPI document such a
    reference would be read from the document's root, where nothing is (the models have no cycles)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


async def read_model(request: Request, model: type[M], *, strict: bool | None = None) -> M:
    """Parse and validate the JSON body; invalid JSON, an unknown field or a value out of range is a 400, a wrong
    shape a 422 naming each field. ``strict`` makes a lax model (one that also reads config files) strict here."""
    body = await request.body()
    try:
        return model.model_validate_json(body, strict=strict)
    except ValidationError as exc:
        raise from_validation_error(exc, model) from None


def sse_event(data: str, event: str | None = None) -> str:
    """One server-sent event; each line of ``data`` becomes its own ``data:`` line, so newlines survive."""
    head = f"event: {event}\n" if event else ""
    if "\n" not in data and "\r" not in data:
        return f"{head}data: {data}\n\n"
    return head + "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data)) + "\n"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@contextmanager
def cancel_on_disconnect(receive: Receive, collector: Collector, delay_s: float = 0.02) -> Iterator[None]:
    """While inside, a client disconnect cancels ``collector`` (its ``next()`` raises).

    The watcher task starts only after ``delay_s``: requests that finish sooner cost one timer, not a task.
    """
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None

    def start() -> None:
        nonlocal watcher
        watcher = loop.create_task(_wait_disconnect(receive))
        watcher.add_done_callback(lambda task: None if task.cancelled() else collector.cancel())

    handle = loop.call_later(delay_s, start)
    try:
        yield
    finally:
        handle.cancel()
        if watcher is not None:
            watcher.cancel()


class EventStreamResponse(Response):
    """An SSE response that cancels its collector as soon as the client disconnects."""

    def __init__(self, chunks: AsyncIterator[str], collector: Collector, on_close: Callable[[], None]) -> None:
        self.status_code = 200
        self.background = None
        self.chunks = chunks
        self.collector = collector
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with cancel_on_disconnect(receive, self.collector):
            try:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-write
            finally:
                self.on_close()


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with a 413, by header or while reading (pure ASGI). A body that does not
    arrive in time is the HTTP protocol's to refuse (``body_timeout_s``: :mod:`liftoff.gateway.connections`)."""

    def __init__(self, app: ASGIApp, limit: int, render: Renderer) -> None:
        self.app = app
        self.limit = limit
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self.render(self._error(int(length)))(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._error(received)
            return message

        await self.app(scope, limited, send)

    def _error(self, size: int) -> LiftoffError:
        return PayloadTooLargeError(
            f"the body is {size} bytes, over body_size_limit_bytes ({self.limit}); send less or raise the limit"
        )
