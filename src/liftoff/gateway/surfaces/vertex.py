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

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from liftoff.core.errors import LiftoffError
from liftoff.core.types import ModelType, RequestKind
from liftoff.gateway.dispatch import Collector
from liftoff.gateway.errors import json_response
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.surfaces import health
from liftoff.gateway.surfaces.encoders import run_encoder
from liftoff.gateway.surfaces.native import finish_generate, log_request, start_generate
from liftoff.gateway.translate.encode import encode_frame
from liftoff.gateway.translate.vertex import (
    check_instances,
    check_prompts,
    embedding_predictions,
    embedding_texts,
    group_of,
    instances,
)
from liftoff.protocol.native import ERROR_RESPONSES, GenerateRequest
from liftoff.protocol.vertex import VertexRequest, VertexResponse

router = APIRouter(tags=["vertex"])


def _start_all(state: GatewayState, requests: list[GenerateRequest]) -> list[Collector]:
    collectors: list[Collector] = []
    try:
        for request in requests:
            collectors.append(start_generate(state, request))
    except LiftoffError:
        for collector in collectors:
            state.dispatcher.abort(collector)
        raise
    return collectors


async def _predict_embeddings(request: Request, state: GatewayState, body: VertexRequest, group: str) -> Response:
    """Vertex's text-embedding shape: ``{"embeddings": {"values": [...], "statistics": {...}}}`` per instance."""
    texts = embedding_texts(body)
    out = await run_encoder(request, state, encode_frame(RequestKind.EMBED, texts, group, state.config))
    return json_response({"predictions": embedding_predictions(out)})


async def predict(request: Request) -> Response:
    """Run every instance; answer their predictions in order, or the first error."""
    state = get_state(request)
    body = await read_model(request, VertexRequest)
    check_instances(body, state.config)
    group = group_of(body)
    if ModelType.EMBEDDING in state.registry.live_model_types(group):
        return await _predict_embeddings(request, state, body, group)
    requests = instances(body)
    check_prompts(requests, state.config)
    collectors = _start_all(state, requests)
    predictions = []
    try:
        for instance, collector in zip(requests, collectors, strict=True):
            predictions.append(await finish_generate(request, state, instance, collector))
    finally:
        for collector in collectors:
            if not collector.done:
                state.dispatcher.abort(collector)
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


def add_aip_routes(app: FastAPI, health_route: str | None, predict_route: str | None) -> None:
    """Serve health and predict at the paths Vertex AI assigned too (when they are set)."""
    if health_route and health_route != "/healthz":
        app.add_api_route(health_route, health.healthz, methods=["GET"], tags=["vertex"])
    if predict_route and predict_route != "/generate_vertex":
        app.add_api_route(
            predict_route, predict, methods=["POST"], response_model=VertexResponse, responses=ERROR_RESPONSES,
            openapi_extra=json_body(VertexRequest), tags=["vertex"],
        )  # fmt: skip
