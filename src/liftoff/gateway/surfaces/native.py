"""The native inference API (port 3000): ``/generate``, ``/generate_stream`` and the masked ``/status``.

The work is the generation service's (:mod:`liftoff.gateway.generation`); the answers and events are
:mod:`liftoff.gateway.translate.native`'s. ``/generate`` is also SageMaker's ``/invocations``
(:func:`liftoff.gateway.generation.generate_buffered`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.types import ReaderState
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import GENERATE_BODY, Generation, generate_buffered, log_request
from liftoff.gateway.http import read_model
from liftoff.gateway.state import get_state
from liftoff.gateway.translate.native import NativeEvents
from liftoff.protocol.native import ERROR_RESPONSES, GenerateRequest, GenerateResponse

router = APIRouter(tags=["inference"])


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES, openapi_extra=GENERATE_BODY)
async def generate(request: Request) -> Response:
    """Generate a completion (or one per prompt of a list), buffered."""
    return await generate_buffered(request, "/generate")


_SSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-sent events", "content": {"text/event-stream": {}}}
}


@router.post("/generate_stream", response_model=None, responses=_SSE | ERROR_RESPONSES, openapi_extra=GENERATE_BODY)
async def generate_stream(request: Request) -> Response:
    """Generate with server-sent events: one event per token; ``{"text", "batch_id"}`` events for a list."""
    state = get_state(request)
    body = await read_model(request, GenerateRequest)

    def logged(finished: bool) -> None:
        log_request(state, "/generate_stream", body, "(streamed)" if finished else "(cancelled)")

    with Generation(request, state) as generation:
        return await generation.stream(generation.start_generate(body), NativeEvents(body), logged)


@router.get("/status", responses={503: ERROR_RESPONSES[503]})
async def masked_status(request: Request) -> Response:
    """Live and dead readers without pids or consumer names, and the ports served; 503 until a reader is live."""
    state = get_state(request)
    body: dict[str, Any] = {**state.registry.masked_status(), "ports": state.ports()}
    return json_response(body, 200 if state.registry.count(ReaderState.LIVE) else 503)
