"""Per-reader services that need the model's tokenizer but not the batch: tokenize, detokenize, chat template.

They run on a worker thread of the reader process, beside the engine thread, and answer with one frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from liftoff.backends.base import ModelBackend
from liftoff.core.errors import BackendError, LiftoffError
from liftoff.core.frames import OutputFrame, RequestFrame, ResultFrame, error_frame
from liftoff.core.types import RequestKind

logger = logging.getLogger(__name__)

Service = Callable[[ModelBackend, dict[str, Any]], dict[str, Any]]


def _tokenize(backend: ModelBackend, payload: dict[str, Any]) -> dict[str, Any]:
    tokens = backend.tokenize(
        payload["text"],
        use_chat_template=bool(payload.get("use_chat_template")),
        add_special_tokens=not payload.get("skip_special_tokens"),
    )
    return {"tokens": tokens, "tokens_count": len(tokens)}


def _detokenize(backend: ModelBackend, payload: dict[str, Any]) -> dict[str, Any]:
    skip = payload.get("skip_special_tokens")
    return {"text": backend.detokenize(payload["tokens"], skip_special_tokens=True if skip is None else bool(skip))}


def _chat_template(backend: ModelBackend, payload: dict[str, Any]) -> dict[str, Any]:
    add = bool(payload.get("add_generation_prompt"))
    messages = [
        backend.apply_chat_template(conversation, add_generation_prompt=add) for conversation in payload["inputs"]
    ]
    return {"messages": messages}


SERVICES: dict[RequestKind, Service] = {
    RequestKind.TOKENIZE: _tokenize,
    RequestKind.DETOKENIZE: _detokenize,
    RequestKind.CHAT_TEMPLATE: _chat_template,
}


def serve(backend: ModelBackend, frame: RequestFrame) -> OutputFrame:
    """Answer one service request with a result or an error frame (never raises)."""
    try:
        data = SERVICES[frame.kind](backend, frame.payload)
    except LiftoffError as exc:
        return error_frame(frame.request_id, exc)
    except Exception as exc:
        logger.exception("%s failed", frame.kind)
        return error_frame(frame.request_id, BackendError(f"{frame.kind} failed: {exc}"))
    return ResultFrame(request_id=frame.request_id, seq=0, data=data)
