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

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError, ValidationFailedError
from liftoff.core.types import ModelType, RequestKind
from liftoff.gateway.dispatch import Collector
from liftoff.gateway.errors import from_validation_error, json_response
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.surfaces import health
from liftoff.gateway.surfaces.encoders import run_encoder
from liftoff.gateway.surfaces.native import echo, finish_generate, start_generate
from liftoff.gateway.translate.encode import encode_frame, floats
from liftoff.gateway.translate.native import DEFAULT_GROUP, prompt_count, prompts_of, utf8_size
from liftoff.protocol.native import ERROR_RESPONSES, GenerateRequest, GenerateResponse

router = APIRouter(tags=["vertex"])


class VertexRequest(BaseModel):
    """A Vertex AI prediction request."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    instances: list[dict[str, Any]] = Field(..., min_length=1, description="One GenerateRequest per prediction.")
    parameters: dict[str, Any] | None = Field(None, description="Defaults of every instance's fields.")


class VertexResponse(BaseModel):
    """One prediction per instance, in order."""

    predictions: list[GenerateResponse]


def _fields(body: VertexRequest, instance: dict[str, Any]) -> dict[str, Any]:
    """An instance's fields over the shared parameters (an explicit ``null`` keeps the parameter)."""
    return {**(body.parameters or {}), **{key: value for key, value in instance.items() if value is not None}}


def _instances(body: VertexRequest) -> list[GenerateRequest]:
    """Each instance over the shared parameters, validated; errors name the instance (``instances.2.text``)."""
    requests = []
    for index, instance in enumerate(body.instances):
        try:
            requests.append(GenerateRequest.model_validate(_fields(body, instance)))
        except ValidationError as exc:
            error = from_validation_error(exc, GenerateRequest)
            if not isinstance(error, ValidationFailedError):
                where = f"instances.{index}" + (f".{error.param}" if error.param else "")
                raise InvalidRequestError(f"instances.{index}: {error.message}", param=where) from None
            errors = [{**item, "loc": f"instances.{index}.{item['loc']}"} for item in error.errors]
            raise ValidationFailedError(f"instances.{index}: {error.message}", errors=errors) from None
    return requests


def _check_instances(body: VertexRequest, config: AppConfig) -> None:
    """``max_user_batch_size`` counts instances before any is expanded (each may take the shared parameters)."""
    if len(body.instances) > config.max_user_batch_size:
        raise InvalidRequestError(
            f"instances has {len(body.instances)} items, more than max_user_batch_size ({config.max_user_batch_size})",
            param="instances",
        )


def _check_prompts(requests: list[GenerateRequest], config: AppConfig) -> None:
    """All instances' prompts together against ``max_user_batch_size``, and their bytes against the body limit
    (shared ``parameters`` may repeat one text in every instance: what the readers get stays what a body holds)."""
    count = sum(prompt_count(request.text) for request in requests)
    if count > config.max_user_batch_size:
        raise InvalidRequestError(
            f"the instances hold {count} prompts, more than max_user_batch_size ({config.max_user_batch_size})",
            param="instances",
        )
    size = sum(utf8_size(text) for request in requests for text in prompts_of(request.text, config))
    if size > config.body_size_limit_bytes:
        raise InvalidRequestError(
            f"the instances hold {size} bytes of prompts, more than body_size_limit_bytes "
            f"({config.body_size_limit_bytes}); send fewer or shorter prompts",
            param="instances",
        )


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


def _group(body: VertexRequest) -> str:
    """The consumer group the instances name (the first instance's, else the parameters', else the default)."""
    group = _fields(body, body.instances[0]).get("consumer_group")
    return group if isinstance(group, str) and group else DEFAULT_GROUP


def _content(instance: dict[str, Any], index: int) -> str:
    text = instance.get("content", instance.get("text"))
    if not isinstance(text, str):
        raise ValidationFailedError(
            f"instances.{index}: an embedding instance needs a string 'content' (or 'text')",
            errors=[{"loc": f"instances.{index}.content", "msg": "a string is required", "type": "string_type"}],
        )
    return text


async def _predict_embeddings(request: Request, state: GatewayState, body: VertexRequest, group: str) -> Response:
    """Vertex's text-embedding shape: ``{"embeddings": {"values": [...], "statistics": {...}}}`` per instance."""
    texts = [_content(instance, index) for index, instance in enumerate(body.instances)]
    out = await run_encoder(request, state, encode_frame(RequestKind.EMBED, texts, group, state.config))
    truncated = set(out.truncated)
    predictions = [
        {"embeddings": {"values": floats(row), "statistics": {"token_count": tokens, "truncated": i in truncated}}}
        for i, (row, tokens) in enumerate(zip(out.rows, out.tokens, strict=True))
    ]
    return json_response({"predictions": predictions})


async def predict(request: Request) -> Response:
    """Run every instance; answer their predictions in order, or the first error."""
    state = get_state(request)
    body = await read_model(request, VertexRequest)
    _check_instances(body, state.config)
    group = _group(body)
    if ModelType.EMBEDDING in state.registry.live_model_types(group):
        return await _predict_embeddings(request, state, body, group)
    requests = _instances(body)
    _check_prompts(requests, state.config)
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
    echo(state, "/generate_vertex", body, result)
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
