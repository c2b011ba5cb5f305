"""The management API (port 3001): status, reader groups, create and delete readers, reader configs.

``GET /status`` matches Takeoff's schema field for field (takeoff-spec §2.2.1); ``GET /reader/{id}`` is a
Liftoff extension that shows a reader's state, the reason it died, the options its backend ignores and its
restarts.
``GET /metrics`` is the Prometheus exposition (:mod:`liftoff.gateway.metrics`). ``POST /reader/{id}/loras`` and
``DELETE /reader/{id}/loras/{name}`` (Liftoff additions) add and remove a live reader's LoRA adapters: the request
goes to that one reader, as the tokenizer services do (:mod:`liftoff.gateway.surfaces.tokens`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response

from liftoff.config.models import ReaderConfig
from liftoff.core.errors import NotFoundError
from liftoff.core.frames import RequestFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import RequestKind
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import get_state
from liftoff.management.manager import Ask
from liftoff.protocol.management import AddLoraRequest, CreatedReader, ReaderGroupEntry, ReaderLoras, StatusResponse
from liftoff.protocol.native import ERROR_RESPONSES

router = APIRouter(tags=["management"])

_CREATE_BODY = json_body(ReaderConfig)


@router.get("/status", response_model=StatusResponse)
async def status(request: Request) -> Response:
    """The app configuration and every reader: loading, live and dead, with their last heartbeats."""
    state = get_state(request)
    body = state.status()
    return json_response(body)


@router.get("/reader_groups", response_model=dict[str, list[ReaderGroupEntry]])
async def reader_groups(request: Request) -> Response:
    """Consumer group → its loading and live readers (``ready`` is true for live ones)."""
    return json_response(get_state(request).registry.reader_groups())


@router.post(
    "/reader", status_code=201, response_model=CreatedReader, responses=ERROR_RESPONSES, openapi_extra=_CREATE_BODY
)
async def create_reader(request: Request) -> Response:
    """Start a reader; it is in ``loading_readers`` until its model is loaded, then in ``live_readers``."""
    state = get_state(request)
    config = await read_model(request, ReaderConfig, strict=True)  # JSON: 0 is not a boolean, "8" not a number
    reader_id = await state.manager.create_from_api(config)
    return json_response({"reader_id": reader_id}, 201)


@router.delete("/reader/{reader_id}", status_code=204, responses={404: ERROR_RESPONSES[404]})
async def delete_reader(request: Request, reader_id: str) -> Response:
    """Stop a reader's processes and forget it."""
    await get_state(request).manager.delete(reader_id)
    return Response(status_code=204)


def _asker(request: Request, reader_id: str) -> Ask:
    """How the manager asks reader ``reader_id`` to change its adapters: one request to it, and its result."""
    state = get_state(request)

    async def ask(kind: RequestKind, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        frame = RequestFrame(request_id=new_request_id(), consumer_group="", kind=kind, reader_id=reader_id,
                             payload=payload)  # fmt: skip
        with Generation(request, state) as generation:
            # not cancelled by a client that leaves: once the reader has made the change, the registry and the
            # manifest must follow it (its own deadline still bounds the wait)
            collector = generation.submit_to_reader(frame, timeout_s)
            return await generation.result(collector, watch_client=False)

    return ask


@router.post("/reader/{reader_id}/loras", response_model=ReaderLoras, responses=ERROR_RESPONSES,
             openapi_extra=json_body(AddLoraRequest))  # fmt: skip
async def add_lora(request: Request, reader_id: str) -> Response:
    """[Liftoff] Load a LoRA adapter into a live reader: requests may name it as lora_id when this answers."""
    state = get_state(request)
    body = await read_model(request, AddLoraRequest)
    names = await state.manager.add_lora(reader_id, body.name, body.path, _asker(request, reader_id),
                                         state.config.lora_load_timeout_s)  # fmt: skip
    return json_response({"reader_id": reader_id, "loras": names})


@router.delete("/reader/{reader_id}/loras/{name}", response_model=ReaderLoras, responses=ERROR_RESPONSES)
async def remove_lora(request: Request, reader_id: str, name: str) -> Response:
    """[Liftoff] Take a LoRA adapter out of a live reader: new requests naming it get a 400 at once; those running
    under it finish."""
    names = await get_state(request).manager.remove_lora(reader_id, name, _asker(request, reader_id))
    return json_response({"reader_id": reader_id, "loras": names})


@router.get("/config/{reader_id}", responses={404: ERROR_RESPONSES[404]})
async def reader_config(request: Request, reader_id: str) -> Response:
    """The ReaderConfig a reader runs with (nulls dropped)."""
    return json_response(get_state(request).manager.config_of(reader_id).public_dict())


@router.get("/metrics", response_class=PlainTextResponse, responses={404: ERROR_RESPONSES[404]})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this gateway and its readers (404 when ``enable_metrics`` is false)."""
    state = get_state(request)
    if state.metrics is None:
        raise NotFoundError("metrics are off on this gateway (enable_metrics is false)")
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/reader/{reader_id}", responses={404: ERROR_RESPONSES[404]})
async def reader_detail(request: Request, reader_id: str) -> Response:
    """[Liftoff] One reader in detail: state, error (why it is dead), notes (ignored options), restarts, config."""
    state = get_state(request)
    record = state.registry.get(reader_id)
    if record is None:
        raise NotFoundError(f"reader {reader_id!r} does not exist", param="reader_id")
    return json_response({**record.detail(), **state.manager.healer.view(reader_id)})
