"""OpenAI response objects and server-sent event streams, for the chat completion and completion endpoints.

A :class:`Call` holds what every response object of one request repeats (``id``, ``created``, ``model``) and its
token counts. A stream is ``data: {chunk}`` events: for chat, first each choice's role, then one chunk per choice
and batch of text, then a chunk with the choice's ``finish_reason``; with ``stream_options.include_usage`` a last
chunk with ``"choices": []`` and the usage; then ``data: [DONE]``. With ``stream_options.continuous_usage_stats``
(vLLM's extension, sent by GuideLLM) every text and finish chunk carries its choice's counts so far. An error after
the first event is ``data: {"error": {...}}`` followed by ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import Request
from starlette.responses import Response

from liftoff.core.errors import LiftoffError, RequestCancelledError, error_from_type
from liftoff.core.frames import ErrorFrame, FinalFrame, TokenFrame
from liftoff.gateway.dispatch import Collector, Item, raise_if_error
from liftoff.gateway.errors import openai_error
from liftoff.gateway.http import EventStreamResponse, cancel_on_disconnect
from liftoff.gateway.state import GatewayState

DONE = "data: [DONE]\n\n"
_FINISH = {"stop": "stop", "length": "length", "aborted": "abort"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI ``usage`` object."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


@dataclass
class Call:
    """One OpenAI request being served: what every response object repeats, and its token counts."""

    model: str
    chat: bool
    n: int
    include_usage: bool = False
    continuous_usage: bool = False
    ident: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        self.ident = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def count(self, index: int, final: FinalFrame) -> None:
        """Add a choice's tokens; a prompt is counted once, however many choices it has."""
        if index % self.n == 0:
            self.prompt_tokens += final.prompt_tokens
        self.completion_tokens += final.completion_tokens

    def usage(self) -> dict[str, int]:
        """The request's token counts."""
        return usage(self.prompt_tokens, self.completion_tokens)

    def head(self, kind: str) -> dict[str, Any]:
        """The fields every response object of this request starts with."""
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model}


def finish_reason(final: FinalFrame | None) -> str:
    """OpenAI's ``finish_reason`` of a final frame."""
    return _FINISH.get(final.finish_reason, final.finish_reason) if final is not None else "stop"


async def stream(request: Request, state: GatewayState, collector: Collector, call: Call) -> Response:
    """Answer once the first frame is in (an error before any output is a plain HTTP error), then stream."""
    try:
        with cancel_on_disconnect(request.receive, collector):
            first = await collector.next()
        if first and isinstance(first[0].frame, ErrorFrame):
            raise_if_error(first[0])
    except BaseException:
        if not collector.done:
            state.dispatcher.abort(collector)
        raise

    def close() -> None:
        if not collector.done:
            state.dispatcher.abort(collector)

    chunks = _events(collector, first, _Chunks(call, len(collector.request_ids)))
    return EventStreamResponse(chunks, collector, close)


class _Chunks:
    """Renders frames as ``chat.completion.chunk`` (or ``text_completion``) events."""

    def __init__(self, call: Call, choices: int) -> None:
        self.call = call
        kind = "chat.completion.chunk" if call.chat else "text_completion"
        with_usage = call.include_usage or call.continuous_usage
        self.head = call.head(kind) | ({"usage": None} if with_usage else {})
        self.render: Callable[[int, str | None, str | None], dict[str, Any]] = (
            self._chat if call.chat else self._completion
        )
        self.choices = choices

    def event(self, choices: list[dict[str, Any]], counts: dict[str, int] | None = None) -> str:
        body = self.head | {"choices": choices} | ({"usage": counts} if counts is not None else {})
        return f"data: {msgspec.json.encode(body).decode()}\n\n"

    @staticmethod
    def _chat(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _completion(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    def _running(self, frame: TokenFrame | FinalFrame) -> dict[str, int] | None:
        """A choice's counts so far, when the client asked for them in every chunk."""
        return usage(frame.prompt_tokens, frame.completion_tokens) if self.call.continuous_usage else None

    def opening(self) -> str:
        """Chat streams start with each choice's role (as OpenAI's do)."""
        if not self.call.chat:
            return ""
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(self.choices)]  # fmt: skip
        return self.event(roles)

    def frames(self, items: list[Item]) -> tuple[str, LiftoffError | None]:
        """The events of a batch of frames (one chunk per choice and event), and the error that ends the stream."""
        texts: dict[int, list[str]] = {}
        last: dict[int, TokenFrame] = {}
        finals: list[str] = []
        error: LiftoffError | None = None
        for item in items:
            frame = item.frame
            if isinstance(frame, TokenFrame) and frame.text:
                texts.setdefault(item.index, []).append(frame.text)
                last[item.index] = frame
            elif isinstance(frame, FinalFrame):
                self.call.count(item.index, frame)
                finals.append(self.event([self.render(item.index, None, finish_reason(frame))], self._running(frame)))
            elif isinstance(frame, ErrorFrame) and error is None:
                error = error_from_type(frame.error_type, frame.message)
        events = [self.event([self.render(index, "".join(parts), None)], self._running(last[index]))
                  for index, parts in texts.items()]  # fmt: skip
        return "".join(events + finals), error

    def closing(self) -> str:
        tail = self.event([], self.call.usage()) if self.call.include_usage else ""
        return tail + DONE


def _error_event(exc: LiftoffError) -> str:
    _, body = openai_error(exc)
    return f"data: {msgspec.json.encode(body).decode()}\n\n{DONE}"


async def _events(collector: Collector, first: list[Item], chunks: _Chunks) -> AsyncIterator[str]:
    items = first
    opening = chunks.opening()
    while items:
        text, error = chunks.frames(items)
        text, opening = opening + text, ""
        if error is not None:
            yield text + _error_event(error)
            return
        if text:
            yield text
        try:
            items = await collector.next()
        except RequestCancelledError:
            return
        except LiftoffError as exc:
            yield _error_event(exc)
            return
    yield chunks.closing()
