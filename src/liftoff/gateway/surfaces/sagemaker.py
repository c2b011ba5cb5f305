"""The SageMaker API (``sagemaker_port``, default 8080): ``POST /invocations`` and ``GET /ping`` (takeoff-spec §2.6).

``/invocations`` is ``/generate`` (same body, same answer). ``/ping`` answers ``{"status": "healthy"}`` with 200
once a reader is live and ``{"status": "unhealthy"}`` with 503 before, because SageMaker sends traffic only after a
200 ping. Takeoff answered the whole management status there; that told anyone who reached the inference
surfaces the readers' pids and the server's paths, so ``/ping`` says only what SageMaker reads: the status code.
It needs no key, as SageMaker's health checks send none.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.types import ReaderState
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import GENERATE_BODY, generate_buffered
from liftoff.gateway.state import get_state
from liftoff.protocol.native import ERROR_RESPONSES, GenerateResponse

router = APIRouter(tags=["sagemaker"])


@router.post("/invocations", response_model=GenerateResponse, responses=ERROR_RESPONSES,
             openapi_extra=GENERATE_BODY)  # fmt: skip
async def invocations(request: Request) -> Response:
    """``/generate`` under SageMaker's path."""
    return await generate_buffered(request, "/invocations")


@router.get("/ping", responses={503: {"description": "No reader is live yet"}})
async def ping(request: Request) -> Response:
    """``{"status": "healthy"}`` (200) when at least one reader is live, else ``{"status": "unhealthy"}`` (503)."""
    live = get_state(request).registry.count(ReaderState.LIVE) > 0
    return json_response({"status": "healthy" if live else "unhealthy"}, 200 if live else 503)
