"""The SageMaker API (``sagemaker_port``, default 8080): ``POST /invocations`` and ``GET /ping`` (takeoff-spec §2.6).

``/invocations`` is ``/generate`` (same body, same answer). ``/ping`` answers the management ``/status`` payload;
its status is 200 once a reader is live and 503 before, because SageMaker sends traffic only after a 200 ping.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.types import ReaderState
from liftoff.gateway.errors import json_response
from liftoff.gateway.state import get_state
from liftoff.gateway.surfaces import native
from liftoff.protocol.management import StatusResponse
from liftoff.protocol.native import ERROR_RESPONSES, GenerateResponse

router = APIRouter(tags=["sagemaker"])


@router.post("/invocations", response_model=GenerateResponse, responses=ERROR_RESPONSES,
             openapi_extra=native.generate_body())  # fmt: skip
async def invocations(request: Request) -> Response:
    """``/generate`` under SageMaker's path."""
    return await native.generate(request)


@router.get("/ping", response_model=StatusResponse, responses={503: {"description": "No reader is live yet"}})
async def ping(request: Request) -> Response:
    """The management status; 200 when at least one reader is live, else 503."""
    state = get_state(request)
    body = state.status()
    return json_response(body, 200 if state.registry.count(ReaderState.LIVE) else 503)
