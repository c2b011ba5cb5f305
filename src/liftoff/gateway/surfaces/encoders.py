"""Encoder routes: ``POST /embed`` and ``POST /classify`` (takeoff-spec §2.1.5-6) and ``POST /rerank`` on the
inference port; ``/v1/rerank`` and ``/v2/rerank`` (Cohere's and Jina's clients) on the OpenAI port.

Each request goes to an embedding or classification reader as one broker request; the reader's dynamic batcher
mixes its inputs with other requests'. Answers say which inputs were cut to the model's length (``truncated``);
``return_metadata`` adds token counts and the size of the batch each input ran in.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.errors import NotSupportedError
from liftoff.core.frames import RequestFrame
from liftoff.core.types import RequestKind
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.translate.encode import Encoded, encode_frame, floats, relevance
from liftoff.gateway.translate.openai import input_usage
from liftoff.protocol.native import (
    ERROR_RESPONSES,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
)
from liftoff.protocol.openai import ERROR_RESPONSES as OPENAI_ERRORS

router = APIRouter(tags=["inference"])
openai_router = APIRouter(tags=["rerank"])


async def run_encoder(request: Request, state: GatewayState, frame: RequestFrame) -> Encoded:
    """Run one encoder request and read its rows."""
    with Generation(request, state) as generation:
        return await generation.encode(frame)


def _answer(result: object, out: Encoded, metadata: bool | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"result": result, "truncated": out.truncated}
    if metadata:
        answer["metadata"] = out.metadata()
    return answer


@router.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES, openapi_extra=json_body(EmbedRequest))
async def embed(request: Request) -> Response:
    """The embedding of a text, or one per text of a list."""
    state = get_state(request)
    body = await read_model(request, EmbedRequest)
    frame = encode_frame(RequestKind.EMBED, body.text, body.consumer_group, state.config, body.truncate)
    out = await run_encoder(request, state, frame)
    vectors = [floats(row) for row in out.rows]
    return json_response(_answer(vectors[0] if isinstance(body.text, str) else vectors, out, body.return_metadata))


@router.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             openapi_extra=json_body(ClassifyRequest))  # fmt: skip
async def classify(request: Request) -> Response:
    """Raw scores (logits) of each text or ``[text, text_pair]`` pair: one row per input."""
    state = get_state(request)
    body = await read_model(request, ClassifyRequest)
    frame = encode_frame(RequestKind.CLASSIFY, body.text, body.consumer_group, state.config, body.truncate)
    out = await run_encoder(request, state, frame)
    return json_response(_answer([floats(row) for row in out.rows], out, body.return_metadata))


def _document(document: str | RerankDocument) -> str:
    return document if isinstance(document, str) else document.text


async def rerank(request: Request) -> Response:
    """Documents ordered by a cross-encoder's relevance to the query (Cohere's and Jina's response shape)."""
    state = get_state(request)
    body = await read_model(request, RerankRequest)
    for name in ("rank_fields", "max_chunks_per_doc", "max_tokens_per_doc"):
        if getattr(body, name) is not None:
            raise NotSupportedError(f"{name} is not supported by this server; leave it out", param=name)
    texts = [_document(document) for document in body.documents]
    group = body.consumer_group or body.model
    pairs = [[body.query, text] for text in texts]
    frame = encode_frame(RequestKind.CLASSIFY, pairs, group, state.config, body.truncate)
    out = await run_encoder(request, state, frame)
    scores = [relevance(floats(row)) for row in out.rows]
    order = sorted(range(len(scores)), key=lambda index: -scores[index])[: body.top_n]
    keep = body.return_documents is not False
    results = [
        {"index": index, "relevance_score": scores[index]} | ({"document": {"text": texts[index]}} if keep else {})
        for index in order
    ]
    usage = input_usage(out.prompt_tokens)
    return json_response({"id": frame.request_id, "model": frame.consumer_group, "results": results,
                          "usage": usage, "meta": {"billed_units": {"search_units": 1}}})  # fmt: skip


_RERANK_ROUTES = ((router, "/rerank", ERROR_RESPONSES), (openai_router, "/v1/rerank", OPENAI_ERRORS),
                  (openai_router, "/v2/rerank", OPENAI_ERRORS))  # fmt: skip
for _router, _path, _errors in _RERANK_ROUTES:
    _router.add_api_route(_path, rerank, methods=["POST"], summary="Rerank", response_model=RerankResponse,
                          responses=_errors, openapi_extra=json_body(RerankRequest))  # fmt: skip
