"""OpenAI API ↔ core both ways: chat and completion requests → one :class:`RequestFrame` per (prompt, choice);
and back, the frames → a buffered answer (:func:`completion_answer`) or a stream's chunks (:class:`OpenAIEvents`).

``model`` is the consumer group, or ``group:adapter`` for one of its LoRA adapters (the surface resolves it into a
group and a ``lora_id``). A field Liftoff does not implement is refused with a 400 that names it, never
dropped. Sampling follows OpenAI's defaults (temperature 1, no top-k), not the native API's greedy default.
Stop strings, ``seed``, ``ignore_eos`` and ``min_tokens`` go to the reader with the other decoding parameters.
``response_format`` becomes the native ``json_schema``: ``json_object`` any JSON object, ``json_schema`` its
``schema``, ``text`` nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError, NotSupportedError, error_from_type
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import GenerationParams
from liftoff.gateway.dispatch import Item
from liftoff.gateway.errors import openai_error
from liftoff.gateway.translate.native import prompts_of
from liftoff.protocol.limits import MAX_STOPS, SEED_MAX
from liftoff.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponseFormat

# Without max_tokens a chat completion runs until the model stops or its context is full (as OpenAI's does);
# a completion generates 16 tokens (OpenAI's default).
CHAT_MAX_TOKENS = 1 << 20
COMPLETION_MAX_TOKENS = 16
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object


@dataclass(frozen=True, slots=True)
class Plan:
    """The frames of one OpenAI request: ``n`` choices per prompt, choice ``i * n + j`` is frame ``i * n + j``."""

    frames: list[RequestFrame]
    n: int


def _refuse(fields: Iterable[tuple[str, bool]], extra: dict[str, object] | None) -> None:
    for name, used in fields:
        if used:
            raise NotSupportedError(f"{name} is not supported by this server; leave it out", param=name)
    for name, value in (extra or {}).items():
        if value is not None:
            raise NotSupportedError(f"{name} is not a field this server knows; leave it out", param=name)


def _common_unsupported(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, bool]]:
    """The checks both endpoints make; unknown ``stream_options`` are refused here at once."""
    options = body.stream_options.model_extra if body.stream_options is not None else None
    _refuse([], {f"stream_options.{name}": value for name, value in (options or {}).items()})
    return [
        ("frequency_penalty", body.frequency_penalty not in (None, 0)),
        ("presence_penalty", body.presence_penalty not in (None, 0)),
        ("logit_bias", bool(body.logit_bias)),
        ("logprobs", body.logprobs not in (None, False)),
    ]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise InvalidRequestError(f"stop has {len(stops)} strings; send at most {MAX_STOPS}", param="stop")
    return tuple(text for text in stops if text)


def _params(body: ChatCompletionRequest | CompletionRequest, max_tokens: int, *, chat: bool) -> GenerationParams:
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        message = f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})"
        raise InvalidRequestError(message, param="min_tokens")
    return GenerationParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        use_chat_template=chat,
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        stop=_stops(body.stop),
        running_counts=bool(body.stream and body.stream_options and body.stream_options.continuous_usage_stats),
    )


def _frames(prompts: list[str], params: GenerationParams, group: str, n: int, config: AppConfig) -> Plan:
    total = len(prompts) * n
    if total > config.max_user_batch_size:
        raise InvalidRequestError(
            f"{len(prompts)} prompts x n={n} is {total} generations, more than max_user_batch_size "
            f"({config.max_user_batch_size})",
            param="n",
        )
    frames = []
    for prompt in prompts:
        for choice in range(n):
            seeded = params if params.seed is None or choice == 0 else _reseed(params, _wrap(params.seed + choice))
            frames.append(RequestFrame(request_id=new_request_id(), consumer_group=group, text=prompt, params=seeded))
    return Plan(frames, n)


def _prompts(text: str | list[str], config: AppConfig, param: str) -> list[str]:
    """The native limits (``max_user_batch_size``, ``max_prompt_string_bytes``), naming the OpenAI field."""
    return prompts_of(text, config, param)


def _wrap(seed: int) -> int:
    """A seed kept in the range a frame can carry (the largest seeds wrap around, as in unsigned arithmetic)."""
    return seed - (1 << 64) if seed > SEED_MAX else seed


def _reseed(params: GenerationParams, seed: int) -> GenerationParams:
    """The parameters of the next choice of ``n``: same, with its own seed (so choices differ, reproducibly)."""
    return msgspec.structs.replace(params, seed=seed)


def _message_text(message: ChatMessage, index: int) -> str:
    where = f"messages[{index}]"
    extra = {f"{where}.{name}": value for name, value in (message.model_extra or {}).items()}
    _refuse([(f"{where}.name", message.name is not None)], extra)
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidRequestError(f"messages[{index}] has no content", param=f"messages[{index}].content")
    for part in content:
        if part.type != "text" or part.text is None:
            raise NotSupportedError(
                f"content parts of type {part.type!r} need a multimodal reader; send text parts only",
                param=f"messages[{index}].content",
            )
    return "".join(part.text or "" for part in content)


# Roles the chat template gets; ``developer`` (OpenAI's newer name for system) is given as ``system``.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(messages: list[ChatMessage]) -> tuple[tuple[str, str], ...]:
    """The conversation the reader renders with its model's chat template, as (role, text) turns."""
    if not messages:
        raise InvalidRequestError("messages is empty; send at least one message", param="messages")
    turns = []
    for index, message in enumerate(messages):
        role = CHAT_ROLES.get(message.role)
        if role is None:
            raise NotSupportedError(
                f"messages[{index}] has role {message.role!r}: tool and function results need tool calling, which "
                "this server does not do",
                param=f"messages[{index}].role",
            )
        turns.append((role, _message_text(message, index)))
    return tuple(turns)


def response_schema(fmt: ResponseFormat | None) -> str | None:
    """The JSON schema (as text) that ``response_format`` asks the output to follow; None for plain text."""
    if fmt is None:
        return None
    _refuse([], {f"response_format.{name}": value for name, value in (fmt.model_extra or {}).items()})
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_SCHEMA
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        where = "response_format.json_schema" + ("" if spec is None else ".schema")
        raise InvalidRequestError(f"{where} is missing: send the JSON schema the output must follow", param=where)
    _refuse([], {f"response_format.json_schema.{name}": value for name, value in (spec.model_extra or {}).items()})
    return json.dumps(spec.schema_)


def _adapter(params: GenerationParams, lora_id: str | None) -> GenerationParams:
    return params if lora_id is None else msgspec.structs.replace(params, lora_id=lora_id)


def chat_plan(body: ChatCompletionRequest, config: AppConfig, group: str | None = None,
              lora_id: str | None = None) -> Plan:  # fmt: skip
    """The frames of a chat completion (the reader applies its chat template) for ``group`` (default: ``model``),
    with the LoRA adapter ``lora_id``."""
    _refuse(
        [
            *_common_unsupported(body),
            ("top_logprobs", body.top_logprobs is not None),
            ("tools", bool(body.tools)),
            ("tool_choice", body.tool_choice not in (None, "none")),
            ("functions", bool(body.functions)),
            ("function_call", body.function_call not in (None, "none")),
        ],
        body.model_extra,
    )
    both = (body.max_tokens, body.max_completion_tokens)
    if None not in both and both[0] != both[1]:
        message = "max_tokens and max_completion_tokens differ; send one"
        raise InvalidRequestError(message, param="max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    turns = chat_messages(body.messages)
    _prompts("".join(content for _, content in turns), config, "messages")  # the size limits, on the whole chat
    params = _adapter(_params(body, max_tokens, chat=True), lora_id)
    schema = response_schema(body.response_format)
    if schema is not None:
        params = msgspec.structs.replace(params, json_schema=schema)
    if len(turns) > 1 or turns[0][0] != "user":  # one user turn is the plain chat-template prompt
        params = msgspec.structs.replace(params, messages=turns)
    return _frames([turns[-1][1]], params, group or body.model, body.n or 1, config)


def completion_plan(body: CompletionRequest, config: AppConfig, group: str | None = None,
                    lora_id: str | None = None) -> Plan:  # fmt: skip
    """The frames of a (legacy) completion: the prompts as they are, no chat template (``group`` and ``lora_id``
    as for :func:`chat_plan`)."""
    _refuse(
        [
            *_common_unsupported(body),
            ("echo", bool(body.echo)),
            ("suffix", body.suffix is not None),
            ("best_of", body.best_of not in (None, 1)),
        ],
        body.model_extra,
    )
    prompts = _prompts(body.prompt, config, "prompt")
    params = _adapter(_params(body, body.max_tokens or COMPLETION_MAX_TOKENS, chat=False), lora_id)
    return _frames(prompts, params, group or body.model, body.n or 1, config)


# ---- answers ----------------------------------------------------------------------------------------------------
# A stream is ``data: {chunk}`` events: for chat, first each choice's role, then one chunk per choice and batch of
# text, then a chunk with the choice's ``finish_reason``; with ``stream_options.include_usage`` a last chunk with
# ``"choices": []`` and the usage; then ``data: [DONE]``. With ``stream_options.continuous_usage_stats`` (vLLM's
# extension, sent by GuideLLM) every text and finish chunk carries its choice's counts so far. An error after the
# first event is ``data: {"error": {...}}`` followed by ``data: [DONE]``.

DONE = "data: [DONE]\n\n"
_FINISH = {"stop": "stop", "length": "length", "aborted": "abort"}


def input_usage(prompt_tokens: int) -> dict[str, int]:
    """The ``usage`` of an answer that generates nothing (embeddings, rerank): OpenAI's and Cohere's shape."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}


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


def choice(call: Call, index: int, text: str, final: FinalFrame | None) -> dict[str, Any]:
    """One choice of a buffered answer."""
    reason = finish_reason(final)
    if call.chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "text": text, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def completion_answer(call: Call, texts: list[list[str]], finals: list[FinalFrame | None]) -> dict[str, Any]:
    """A buffered ``chat.completion`` (or ``text_completion``): every choice, and the request's usage."""
    choices = []
    for index, (parts, final) in enumerate(zip(texts, finals, strict=True)):
        if final is not None:
            call.count(index, final)
        choices.append(choice(call, index, "".join(parts), final))
    kind = "chat.completion" if call.chat else "text_completion"
    return call.head(kind) | {"choices": choices, "usage": call.usage()}


class OpenAIEvents:
    """A stream's events: ``chat.completion.chunk`` (or ``text_completion``) chunks, then ``[DONE]`` (the
    :class:`liftoff.gateway.generation.StreamRenderer` of the OpenAI surface)."""

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

    def error(self, exc: LiftoffError) -> str:
        """``data: {"error": {...}}`` then ``[DONE]``."""
        _, body = openai_error(exc)
        return f"data: {msgspec.json.encode(body).decode()}\n\n{DONE}"
