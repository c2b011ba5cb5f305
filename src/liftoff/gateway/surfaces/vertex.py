"""The Google Vertex AI API (port 3002): ``POST /generate_vertex`` and, for custom containers, the AIP routes.

A prediction request is ``{"instances": [GenerateRequest, ...], "parameters"?: {...}}``; ``parameters`` are
defaults every instance may override (an explicit ``null`` in an instance keeps the default). All instances start
at once and the answer is ``{"predictions": [...]}``, one ``/generate`` answer per instance, in order. Vertex
expects the whole request to fail if one instance does, so the first error is the answer (and the other instances
are aborted). Instances sent to a consumer group of embedding readers are embedded instead, in Vertex's
text-embedding shape (``{"content": ...}`` in, ``{"embeddings": {"values", "statistics"}}`` out). Vertex AI custom
containers are told their port and their health and predict paths in
``AIP_HTTP_PORT``, ``AIP_HEALTH_ROUTE`` and ``AIP_PREDICT_ROUTE``: the config loader makes them the defaults of
``vertex_port``, ``vertex_health_route`` and ``vertex_predict_route``, and the routes are served beside the fixed
ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from liftoff.core.types import ModelType, RequestKind
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation, log_request
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import get_state
from liftoff.gateway.translate.encode import encode_frame
from liftoff.gateway.translate.vertex import (
    check_instances,
    check_prompts,
    embedding_predictions,
    embedding_texts,
    group_of,
    instances,
)
from liftoff.protocol.native import ERROR_RESPONSES
from liftoff.protocol.vertex import VertexRequest, VertexResponse

router = APIRouter(tags=["vertex"])


async def predict(request: Request) -> Response:
    """Run every instance; answer their predictions in order, or the first error (the others are aborted)."""
    state = get_state(request)
    body = await read_model(request, VertexRequest)
    check_instances(body, state.config)
    group = group_of(body)
    with Generation(request, state) as generation:
        if ModelType.EMBEDDING in state.registry.live_model_types(group):
            frame = encode_frame(RequestKind.EMBED, embedding_texts(body), group, state.config)
            return json_response({"predictions": embedding_predictions(await generation.encode(frame))})
        requests = instances(body)
        check_prompts(requests, state.config)
        collectors = [generation.start_generate(instance) for instance in requests]  # all start at once
        predictions = [
            await generation.generate_answer(instance, collector)
            for instance, collector in zip(requests, collectors, strict=True)
        ]
    result = {"predictions": predictions}
    log_request(state, "/generate_vertex", body, result)
    return json_response(result)


router.add_api_route(
    "/generate_vertex",
    predict,
    methods=["POST"],
    response_model=VertexResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_body(VertexRequest),
    summary="Generate Vertex",
)


def add_aip_routes(
    app: FastAPI, health_route: str | None, predict_route: str | None, healthz: Callable[[Request], Awaitable[Response]]
) -> None:
    """Serve health (``healthz``, the health surface's handler) and predict at the paths Vertex AI assigned too
    (when they are set)."""
    if health_route and health_route != "/healthz":
        app.add_api_route(health_route, healthz, methods=["GET"], tags=["vertex"])
    if predict_route and predict_route != "/generate_vertex":
        app.add_api_route(
            predict_route, predict, methods=["POST"], response_model=VertexResponse, responses=ERROR_RESPONSES,
            openapi_extra=json_body(VertexRequest), tags=["vertex"],
        )  # fmt: skip
