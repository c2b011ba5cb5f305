"""The gateway's one generation service: how every surface runs a parsed request through the readers.

A :class:`Generation` is one HTTP request's work: it starts prompts (``/generate`` bodies, OpenAI plans, Vertex
instances, Snowflake rows, encoder inputs, tokenizer services), waits for them while watching the client, or streams
them through a surface-supplied :class:`StreamRenderer`, and aborts whatever has not finished when the request
ends, however it ends (``with``). Surfaces translate (``gateway/translate``) and route; they never talk to
the dispatcher, nor import each other. Takeoff's ``echo`` option (log each request with its answer) is
:func:`log_request`, for every surface.

Streams answer once the first frame is in, so an error before any output (no reader, prompt too long) is a plain
HTTP error; after that, the renderer turns errors into the stream's own error events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from liftoff.core.errors import LiftoffError, RequestCancelledError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame
from liftoff.gateway.dispatch import Collector, Item, gather, raise_if_error, result_of
from liftoff.gateway.errors import json_response
from liftoff.gateway.http import EventStreamResponse, cancel_on_disconnect, json_body, read_model
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.translate.encode import Encoded, encoded
from liftoff.gateway.translate.native import generate_answer, generate_frames
from liftoff.protocol.native import GenerateRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")

GENERATE_BODY = json_body(GenerateRequest)  # ``openapi_extra`` of a route whose body is a ``GenerateRequest``


class StreamRenderer(Protocol):
    """How a surface writes a stream's events (native SSE, OpenAI chunks)."""

    def opening(self) -> str:
        """Events before the first frame's."""

    def frames(self, items: list[Item]) -> tuple[str, LiftoffError | None]:
        """The events of a batch of frames, and the error that ends the stream (None: it goes on)."""

    def error(self, exc: LiftoffError) -> str:
        """The stream's last events when it fails (a deadline, a lost reader)."""

    def closing(self) -> str:
        """Events after the last frame."""


def log_request(state: GatewayState, path: str, body: BaseModel, result: object) -> None:
    """Takeoff's ``echo`` option: log each request with its response (every generation surface calls this)."""
    if state.config.echo:
        logger.info("echo %s request=%s response=%s", path, body.model_dump_json(exclude_none=True), result)


class Generation:
    """One HTTP request's prompts on their way through the readers (see the module docstring)."""

    __slots__ = ("_open", "request", "state")

    def __init__(self, request: Request, state: GatewayState) -> None:
        self.request = request
        self.state = state
        self._open: list[Collector] = []  # started, not yet finished or handed to a stream

    def __enter__(self) -> Generation:  # a plain context manager: an async one costs two coroutines a request
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.abort_rest()

    def abort_rest(self) -> None:
        """Abort every started prompt that has not finished (the request is over)."""
        for collector in self._open:
            if not collector.done:
                self.state.dispatcher.abort(collector)
        self._open.clear()

    # ---- starting -----------------------------------------------------------------------------------------------

    def submit(self, frames: list[RequestFrame]) -> Collector:
        """Start prompts of one consumer group (they run on the readers at once)."""
        collector = self.state.dispatcher.submit(frames)
        self._open.append(collector)
        return collector

    def submit_to_reader(self, frame: RequestFrame, timeout_s: float | None = None) -> Collector:
        """Start a request on one reader (``frame.reader_id``): tokenizer services, adapter changes."""
        collector = self.state.dispatcher.submit_to_reader(frame, timeout_s)
        self._open.append(collector)
        return collector

    def start_generate(self, body: GenerateRequest) -> Collector:
        """Start a ``GenerateRequest``'s prompts."""
        return self.submit(generate_frames(body, self.state.config))

    # ---- waiting ------------------------------------------------------------------------------------------------

    async def _watched(
        self, collector: Collector, wait: Callable[[Collector], Awaitable[T]], *, watch_client: bool = True
    ) -> T:
        """``wait(collector)`` while watching the client (unless ``watch_client`` is false); a client that leaves,
        or any failure, aborts it."""
        try:
            if not watch_client:
                return await wait(collector)
            with cancel_on_disconnect(self.request.receive, collector):
                return await wait(collector)
        finally:
            if not collector.done:
                self.state.dispatcher.abort(collector)

    async def collect(self, collector: Collector) -> tuple[list[list[str]], list[FinalFrame | None]]:
        """Every text piece and final frame of started prompts."""
        return await self._watched(collector, gather)

    async def result(self, collector: Collector, *, watch_client: bool = True) -> dict[str, Any]:
        """The result frame's data of a started request (a service, an encoder). With ``watch_client`` false it is
        awaited even if the client leaves: a change the reader may already have made must reach the records."""
        return await self._watched(collector, result_of, watch_client=watch_client)

    async def generate_answer(self, body: GenerateRequest, collector: Collector) -> dict[str, Any]:
        """``/generate``'s answer to a started ``GenerateRequest``."""
        texts, finals = await self.collect(collector)
        return generate_answer(body, texts, finals)

    async def encode(self, frame: RequestFrame) -> Encoded:
        """Run one encoder request (embed, classify) and read its rows."""
        return encoded(await self.result(self.submit([frame])))

    # ---- streaming ----------------------------------------------------------------------------------------------

    async def stream(
        self, collector: Collector, renderer: StreamRenderer, on_close: Callable[[bool], None] | None = None
    ) -> Response:
        """Answer once the first frame is in (an error before any output is a plain HTTP error), then stream
        through ``renderer``. The stream owns the collector from here: it aborts it if the client leaves, and
        calls ``on_close(finished)`` at the end."""
        with cancel_on_disconnect(self.request.receive, collector):
            first = await collector.next()
        if first and isinstance(first[0].frame, ErrorFrame):
            raise_if_error(first[0])
        self._open.remove(collector)
        dispatcher = self.state.dispatcher

        def close() -> None:
            if not collector.done:
                dispatcher.abort(collector)
            if on_close is not None:
                on_close(collector.done)

        return EventStreamResponse(events(collector, first, renderer), collector, close)


async def events(collector: Collector, first: list[Item], renderer: StreamRenderer) -> AsyncIterator[str]:
    """A stream's events: ``first`` and every later batch of frames, as ``renderer`` writes them."""
    items, opening = first, renderer.opening()
    while items:
        text, error = renderer.frames(items)
        text, opening = opening + text, ""
        if error is not None:
            yield text + renderer.error(error)
            return
        if text:
            yield text
        try:
            items = await collector.next()
        except RequestCancelledError:
            return
        except LiftoffError as exc:
            yield renderer.error(exc)
            return
    if tail := renderer.closing():
        yield tail


async def generate_buffered(request: Request, path: str) -> Response:
    """A ``GenerateRequest`` answered buffered: native ``/generate`` and SageMaker's ``/invocations``."""
    state = get_state(request)
    body = await read_model(request, GenerateRequest)
    with Generation(request, state) as generation:
        result = await generation.generate_answer(body, generation.start_generate(body))
    log_request(state, path, body, result)
    return json_response(result)
