"""What an API reader reads back: stream chunks, embeddings and error bodies of OpenAI-compatible servers.

Pure functions (no I/O), so the mapping is unit-tested without a server. Upstream errors become the taxonomy's
errors: a client error (4xx) keeps its status and the upstream's message; the reader's own key being refused is the
upstream's fault as far as the client is concerned (502); 429 and 5xx are for the caller to retry.
"""

from __future__ import annotations

import json
import sys
from array import array
from dataclasses import dataclass
from typing import Any

import msgspec

from liftoff.core.errors import (
    ContextLengthExceededError,
    ForbiddenError,
    InvalidRequestError,
    LiftoffError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    error_from_type,
)
from liftoff.core.types import FinishReason

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})

_FINISH = {"length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}
_CLIENT_ERRORS: dict[int, type[LiftoffError]] = {404: NotFoundError, 413: PayloadTooLargeError}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One event of an upstream stream: new text (possibly empty), the end, and token counts when sent."""

    text: str = ""
    finish: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def parse_event(data: str | bytes, *, chat: bool) -> Chunk | None:
    """A ``data:`` payload of a chat or completion stream; None for ``[DONE]``. An error event raises it."""
    if data.strip() in ("[DONE]", b"[DONE]"):
        return None
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise UpstreamError(f"the upstream sent an event that is not JSON: {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise UpstreamError(f"the upstream sent an unexpected event: {data[:200]!r}")
    if "error" in event:
        raise stream_error(event["error"])
    text, finish = _choice(event.get("choices"), chat=chat)
    usage = event.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Chunk(text, finish, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))


def _choice(choices: Any, *, chat: bool) -> tuple[str, FinishReason | None]:
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None  # the usage chunk, or a keep-alive
    choice = choices[0]
    if chat:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    reason = choice.get("finish_reason")
    finish = _FINISH.get(reason, FinishReason.STOP) if reason else None
    return text if isinstance(text, str) else "", finish


def _count(usage: dict[str, Any], key: str) -> int | None:
    value = usage.get(key)
    return value if isinstance(value, int) else None


def stream_error(error: Any) -> LiftoffError:
    """An ``{"error": ...}`` event sent mid-stream; a Liftoff upstream's ``code`` keeps its error type."""
    if not isinstance(error, dict):
        return UpstreamError(f"the upstream failed mid-stream: {error}")
    message = str(error.get("message") or error)
    code = error.get("code")
    if isinstance(code, str) and error_from_type(code, message).error_type == code:
        return error_from_type(code, message)
    return UpstreamError(f"the upstream failed mid-stream: {message}")


def error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI's ``error.message``, vLLM's ``message``, FastAPI's ``detail``."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace").strip()[:500] or "(empty answer)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return json.dumps(data)[:500]


def client_error(status: int, message: str, upstream: str) -> LiftoffError:
    """The error a client gets for an upstream 4xx (not 429): the same status where the taxonomy has it."""
    text = f"{message} (from upstream {upstream})"
    if status in (401, 403):
        return UpstreamError(f"the upstream {upstream} refused this reader's key ({status}): {message}")
    if status in _CLIENT_ERRORS:
        return _CLIENT_ERRORS[status](text)
    if status == 400 and "context" in message.lower() and "length" in message.lower():
        return ContextLengthExceededError(text)
    if status == 451:
        return ForbiddenError(text)
    return InvalidRequestError(text)


def retry_after_s(value: str | None) -> float:
    """A ``Retry-After`` header in seconds (0 when absent or a date)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def embedding_rows(answer: Any, count: int) -> list[bytes]:
    """The vectors of an ``/embeddings`` answer, in input order, as little-endian float32 bytes."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != count:
        got = len(data) if isinstance(data, list) else "no"
        raise UpstreamError(f"the upstream answered {got} embeddings for {count} inputs")
    rows: list[bytes] = [b""] * count
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else position
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list) or not isinstance(index, int) or not 0 <= index < count:
            raise UpstreamError("the upstream's embeddings answer has an entry without a float vector")
        values = array("f", vector)
        if sys.byteorder == "big":
            values.byteswap()
        rows[index] = values.tobytes()
    return rows


def share_tokens(total: int, texts: list[str]) -> list[int]:
    """Per-input token counts when the upstream gives only the total: shared out by UTF-8 length (largest
    remainders), so they add up to the upstream's count; exact for a single input."""
    sizes = [max(1, len(text.encode())) for text in texts]
    whole = sum(sizes)
    shares = [total * size / whole for size in sizes]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(texts)), key=lambda i: counts[i] - shares[i])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts
