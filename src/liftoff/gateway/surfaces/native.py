"""The native inference API (port 3000): ``/generate``, ``/generate_stream`` and the masked ``/status``.

Streams wait for the first frame before answering, so an error that happens before any token (no reader,
prompt too long) is a plain HTTP error; after that, an error is the stream's last event (``event: error``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from liftoff.core.errors import LiftoffError, RequestCancelledError
from liftoff.core.frames import ErrorFrame, FinalFrame, TokenFrame
from liftoff.core.types import ReaderState
from liftoff.gateway.dispatch import Collector, Item, gather, raise_if_error, result_of
from liftoff.gateway.errors import json_response
from liftoff.gateway.http import EventStreamResponse, cancel_on_disconnect, json_body, read_model, sse_event
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.translate.native import generate_frames
from liftoff.protocol.native import ERROR_RESPONSES, GenerateRequest, GenerateResponse

logger = logging.getLogger(__name__)

router = APIRouter(tags=["inference"])
T = TypeVar("T")

_BODY = json_body(GenerateRequest)


def generate_body() -> dict[str, object]:
    """``openapi_extra`` of a route whose body is a ``GenerateRequest``."""
    return _BODY


def _metadata(frame: FinalFrame) -> dict[str, Any]:
    return {
        "prompt_tokens": frame.prompt_tokens,
        "completion_tokens": frame.completion_tokens,
        "finish_reason": frame.finish_reason,
        "reader_id": frame.reader_id,
    }


def log_request(state: GatewayState, path: str, body: BaseModel, result: object) -> None:
    """Takeoff's ``echo`` option: log each request with its response (every generation surface calls this)."""
    if state.config.echo:
        logger.info("echo %s request=%s response=%s", path, body.model_dump_json(exclude_none=True), result)


async def _submit(request: Request) -> tuple[GatewayState, GenerateRequest, Collector]:
    state = get_state(request)
    body = await read_model(request, GenerateRequest)
    return state, body, start_generate(state, body)


async def _watched(
    request: Request, state: GatewayState, collector: Collector, wait: Callable[[Collector], Awaitable[T]]
) -> T:
    """``wait(collector)`` while watching the client; a client that leaves, or any failure, aborts what is left."""
    try:
        with cancel_on_disconnect(request.receive, collector):
            return await wait(collector)
    finally:
        if not collector.done:
            state.dispatcher.abort(collector)


async def collect(
    request: Request, state: GatewayState, collector: Collector
) -> tuple[list[list[str]], list[FinalFrame | None]]:
    """Every piece and final frame of a submitted request (aborted if the client leaves or anything fails)."""
    return await _watched(request, state, collector, gather)


async def collect_result(request: Request, state: GatewayState, collector: Collector) -> dict[str, Any]:
    """The result frame's data of a submitted request (aborted if the client leaves or anything fails)."""
    return await _watched(request, state, collector, result_of)


def start_generate(state: GatewayState, body: GenerateRequest) -> Collector:
    """Submit a ``GenerateRequest`` (its prompts start on the readers at once)."""
    return state.dispatcher.submit(generate_frames(body, state.config))


async def finish_generate(
    request: Request, state: GatewayState, body: GenerateRequest, collector: Collector
) -> dict[str, Any]:
    """Wait for a submitted request and return ``/generate``'s answer; on any failure, abort what is left."""
    texts, finals = await collect(request, state, collector)
    joined = ["".join(parts) for parts in texts]
    result: dict[str, Any] = {"text": joined[0] if isinstance(body.text, str) else joined}
    if body.return_metadata:
        metas = [_metadata(final) for final in finals if final is not None]
        result["metadata"] = metas[0] if isinstance(body.text, str) else metas
    return result


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY)
async def generate(request: Request) -> Response:
    """Generate a completion (or one per prompt of a list), buffered."""
    state, body, collector = await _submit(request)
    result = await finish_generate(request, state, body, collector)
    log_request(state, "/generate", body, result)
    return json_response(result)


_SSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-sent events", "content": {"text/event-stream": {}}}
}


@router.post("/generate_stream", response_model=None, responses=_SSE | ERROR_RESPONSES, openapi_extra=_BODY)
async def generate_stream(request: Request) -> Response:
    """Generate with server-sent events: one event per token; ``{"text", "batch_id"}`` events for a list."""
    state, body, collector = await _submit(request)
    try:
        with cancel_on_disconnect(request.receive, collector):
            first = await collector.next()
        if first and isinstance(first[0].frame, ErrorFrame):
            raise_if_error(first[0])  # failed before any output: a plain HTTP error
    except BaseException:
        if not collector.done:
            state.dispatcher.abort(collector)
        raise
    batch = not isinstance(body.text, str)
    chunks = _events(collector, first, batch=batch, metadata=bool(body.return_metadata))

    def close() -> None:
        if not collector.done:
            state.dispatcher.abort(collector)
        log_request(state, "/generate_stream", body, "(streamed)" if collector.done else "(cancelled)")

    return EventStreamResponse(chunks, collector, close)


def _render(item: Item, *, batch: bool, metadata: bool) -> str:
    frame = item.frame
    if isinstance(frame, TokenFrame):
        if not frame.text:
            return ""
        if batch:
            return sse_event(msgspec.json.encode({"text": frame.text, "batch_id": item.index}).decode())
        return sse_event(frame.text)
    if isinstance(frame, FinalFrame):
        if not metadata:
            return ""
        meta = _metadata(frame) | ({"batch_id": item.index} if batch else {})
        return sse_event(msgspec.json.encode(meta).decode(), event="metadata")
    if not isinstance(frame, ErrorFrame):
        return ""
    error = {"detail": frame.message, "error_type": frame.error_type} | ({"batch_id": item.index} if batch else {})
    return sse_event(msgspec.json.encode(error).decode(), event="error")


async def _events(collector: Collector, first: list[Item], *, batch: bool, metadata: bool) -> AsyncIterator[str]:
    items = first
    while items:
        chunk = "".join(_render(item, batch=batch, metadata=metadata) for item in items)
        if chunk:
            yield chunk
        try:
            items = await collector.next()
        except RequestCancelledError:
            return
        except LiftoffError as exc:
            error = {"detail": exc.message, "error_type": exc.error_type}
            yield sse_event(msgspec.json.encode(error).decode(), "error")
            return


@router.get("/status", responses={503: ERROR_RESPONSES[503]})
async def masked_status(request: Request) -> Response:
    """Live and dead readers without pids or consumer names, and the ports served; 503 until a reader is live."""
    state = get_state(request)
    body: dict[str, Any] = {**state.registry.masked_status(), "ports": state.ports()}
    return json_response(body, 200 if state.registry.count(ReaderState.LIVE) else 503)
