"""The OpenAI-compatible API (port 3003): chat completions, completions, embeddings and the model list.

``model`` is a consumer group, or ``group:adapter`` for one of its readers' LoRA adapters (as vLLM names them:
the adapter's name alone also works when one group has it). Requests are translated in
``gateway/translate/openai.py``, which also builds the buffered answers and the streams' chunks; the generation
service (``gateway/generation.py``) runs them. Token counts are the reader's.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.errors import NotFoundError, NotSupportedError
from liftoff.core.types import RequestKind
from liftoff.gateway.dispatch import shown
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation, log_request
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import get_state
from liftoff.gateway.translate.encode import base64_row, encode_frame, floats
from liftoff.gateway.translate.openai import (
    Call,
    OpenAIEvents,
    Plan,
    chat_plan,
    completion_answer,
    completion_plan,
    input_usage,
)
from liftoff.management.registry import ReaderRegistry
from liftoff.protocol.openai import ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, EmbeddingRequest

router = APIRouter(tags=["openai"])

_STARTED = int(time.time())
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or server-sent events when stream is true", "content": {"text/event-stream": {}}}
}


def _call(body: ChatCompletionRequest | CompletionRequest, plan: Plan, *, chat: bool) -> Call:
    options = body.stream_options
    include = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    return Call(body.model, chat=chat, n=plan.n, include_usage=include, continuous_usage=continuous)


async def _serve(
    request: Request, body: ChatCompletionRequest | CompletionRequest, plan: Plan, *, chat: bool
) -> Response:
    state = get_state(request)
    call = _call(body, plan, chat=chat)
    with Generation(request, state) as generation:
        collector = generation.submit(plan.frames)
        if body.stream:
            log_request(state, request.url.path, body, "(streamed)")
            return await generation.stream(collector, OpenAIEvents(call, len(collector.request_ids)))
        result = completion_answer(call, *await generation.collect(collector))
    log_request(state, request.url.path, body, result)
    return json_response(result)


@router.post("/v1/chat/completions", response_model=None, responses=_SSE | ERROR_RESPONSES,
             openapi_extra=json_body(ChatCompletionRequest))  # fmt: skip
async def chat_completions(request: Request) -> Response:
    """A chat completion of a conversation, rendered by the reader's chat template."""
    state = get_state(request)
    body = await read_model(request, ChatCompletionRequest)
    plan = chat_plan(body, state.config, *_target(state.registry, body.model))
    return await _serve(request, body, plan, chat=True)


@router.post("/v1/completions", response_model=None, responses=_SSE | ERROR_RESPONSES,
             openapi_extra=json_body(CompletionRequest))  # fmt: skip
async def completions(request: Request) -> Response:
    """A completion of a prompt (or of each prompt of a list), with no chat template."""
    state = get_state(request)
    body = await read_model(request, CompletionRequest)
    plan = completion_plan(body, state.config, *_target(state.registry, body.model))
    return await _serve(request, body, plan, chat=False)


@router.post("/v1/embeddings", responses=ERROR_RESPONSES, openapi_extra=json_body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    """OpenAI's embeddings list: one vector per input (floats, or base64 float32), real token usage.

    Without ``encoding_format`` the answer also carries Takeoff's ``result`` (a vector, or one per input), which
    the official client's ``embed`` and LangChain's ``TitanTakeoffEmbed`` read; the OpenAI SDK always sends one.
    """
    state = get_state(request)
    body = await read_model(request, EmbeddingRequest)
    texts = _texts(body.input)
    frame = encode_frame(RequestKind.EMBED, texts, body.model, state.config)
    with Generation(request, state) as generation:
        out = await generation.encode(frame)
    if body.dimensions is not None and out.rows and body.dimensions != len(out.rows[0]) // 4:
        raise NotSupportedError(
            f"dimensions={body.dimensions}: the model's embeddings have {len(out.rows[0]) // 4} dimensions and "
            "cannot be shortened", param="dimensions",
        )  # fmt: skip
    encode = base64_row if body.encoding_format == "base64" else floats
    vectors: list[Any] = [encode(row) for row in out.rows]
    data = [{"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)]
    result: dict[str, Any] = {"object": "list", "data": data, "model": body.model,
                              "usage": input_usage(out.prompt_tokens), "truncated": out.truncated}  # fmt: skip
    if body.encoding_format is None:  # Takeoff's clients (takeoff-client, LangChain's TitanTakeoffEmbed) read this
        result["result"] = vectors[0] if isinstance(texts, str) else vectors
    return json_response(result)


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> str | list[str]:
    if isinstance(value, str) or all(isinstance(item, str) for item in value):
        return value  # type: ignore[return-value]  # checked: every item is a string
    raise NotSupportedError(
        "input holds token ids; Liftoff embeds text (token ids of another tokenizer would not match the model's): "
        "send the text instead",
        param="input",
    )


def _target(registry: ReaderRegistry, model: str) -> tuple[str, str | None]:
    """The consumer group and LoRA adapter ``model`` names: a group; ``group:adapter``; or an adapter's name
    alone, when exactly one group with a live reader has it (else it is taken as a group, which may not exist)."""
    if registry.knows(model):
        return model, None
    group, colon, adapter = model.rpartition(":")
    if colon and group and adapter:
        return group, adapter
    owners = [group for group in registry.groups() if model in registry.live_loras(group)]
    return (owners[0], model) if len(owners) == 1 else (model, None)


def _model(group: str, adapter: str | None = None) -> dict[str, Any]:
    if adapter is None:
        return {"id": group, "object": "model", "created": _STARTED, "owned_by": "liftoff"}
    return {"id": f"{group}:{adapter}", "object": "model", "created": _STARTED, "owned_by": "liftoff", "parent": group}


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """One model per consumer group that has a live reader, and one per LoRA adapter of its live readers
    (``group:adapter``)."""
    registry = get_state(request).registry
    groups = [group for group in registry.groups() if registry.has_live(group)]
    data = []
    for group in groups:
        data += [_model(group), *(_model(group, name) for name in registry.live_loras(group))]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model}", responses={404: ERROR_RESPONSES[404]})
async def model(request: Request, model: str) -> Response:
    """One consumer group with a live reader, or ``group:adapter`` for a LoRA adapter of one; 404 otherwise."""
    registry = get_state(request).registry
    if registry.has_live(model):
        return json_response(_model(model))
    group, _, adapter = model.rpartition(":")
    if group and adapter in registry.live_loras(group):
        return json_response(_model(group, adapter))
    raise NotFoundError(f"no consumer group {shown(model)} with a live reader", param="model")
