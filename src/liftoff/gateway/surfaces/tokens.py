"""Per-reader tokenizer services on the inference port: ``/tokenize``, ``/detokenize``, ``/chat_template``.

They are addressed by reader id, not consumer group, because tokenizers belong to models (takeoff-spec §2.1.7-9).
Their inputs have the limits of prompts (``max_prompt_string_bytes`` per text or conversation, ``max_user_batch_size``
conversations), so one of them is never a long task for the reader.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from liftoff.core.frames import RequestFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import RequestKind
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import get_state
from liftoff.gateway.translate.native import check_batch, prompts_of, utf8_size
from liftoff.protocol.native import (
    ERROR_RESPONSES,
    ChatTemplateRequest,
    ChatTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["tokenizer"])


async def _ask(request: Request, reader_id: str, kind: RequestKind, payload: dict[str, Any]) -> Response:
    state = get_state(request)
    frame = RequestFrame(
        request_id=new_request_id(), consumer_group="", kind=kind, reader_id=reader_id, payload=payload
    )
    with Generation(request, state) as generation:
        return json_response(await generation.result(generation.submit_to_reader(frame)))


def _payload(body: BaseModel) -> dict[str, Any]:
    return body.model_dump(exclude_none=True)


@router.post("/tokenize/{reader_id}", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             openapi_extra=json_body(TokenizeRequest))  # fmt: skip
async def tokenize(request: Request, reader_id: str) -> Response:
    """The tokens of a text, as the reader's model splits it."""
    body = await read_model(request, TokenizeRequest)
    prompts_of(body.text, get_state(request).config)  # max_prompt_string_bytes, as for a prompt
    return await _ask(request, reader_id, RequestKind.TOKENIZE, _payload(body))


@router.post("/detokenize/{reader_id}", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             openapi_extra=json_body(DetokenizeRequest))  # fmt: skip
async def detokenize(request: Request, reader_id: str) -> Response:
    """The text of token ids or vocabulary strings."""
    body = await read_model(request, DetokenizeRequest)
    return await _ask(request, reader_id, RequestKind.DETOKENIZE, _payload(body))


@router.post("/chat_template/{reader_id}", response_model=ChatTemplateResponse, responses=ERROR_RESPONSES,
             openapi_extra=json_body(ChatTemplateRequest))  # fmt: skip
async def chat_template(request: Request, reader_id: str) -> Response:
    """Conversations rendered with the reader's chat template."""
    body = await read_model(request, ChatTemplateRequest)
    config = get_state(request).config
    sizes = [sum(utf8_size(message.content) + utf8_size(message.role) for message in chat) for chat in body.inputs]
    check_batch(sizes, config, single=len(sizes) == 1, what="conversation", param="inputs")
    return await _ask(request, reader_id, RequestKind.CHAT_TEMPLATE, _payload(body))
