"""Native API ↔ core both ways: ``GenerateRequest`` → one :class:`RequestFrame` per prompt, after the gateway's
limits; and back, the frames → ``/generate``'s answer (:func:`generate_answer`) or ``/generate_stream``'s events
(:class:`NativeEvents`)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError, NotSupportedError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import GenerationParams
from liftoff.gateway.dispatch import Item
from liftoff.gateway.http import sse_event
from liftoff.protocol.native import GenerateRequest

DEFAULT_GROUP = "primary"


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (lone surrogates count as three)."""
    return len(text.encode("utf-8", "surrogatepass"))


def check_batch(
    sizes: list[int], config: AppConfig, *, single: bool, what: str = "prompt", param: str = "text"
) -> None:
    """A request's items (of these byte sizes) against ``max_user_batch_size`` and ``max_prompt_string_bytes``;
    errors name the field ``param``."""
    if not sizes:
        raise InvalidRequestError(f"{param} is an empty list; send at least one {what}", param=param)
    if len(sizes) > config.max_user_batch_size:
        raise InvalidRequestError(
            f"{param} has {len(sizes)} {what}s, more than max_user_batch_size ({config.max_user_batch_size})",
            param=param,
        )
    limit = config.max_prompt_string_bytes
    for index, size in enumerate(sizes):
        if size > limit:
            where = f"the {what}" if single else f"{what} {index}"
            raise InvalidRequestError(
                f"{where} is {size} bytes, more than max_prompt_string_bytes ({limit})", param=param
            )


def prompt_count(text: str | list[str]) -> int:
    """How many prompts a ``text`` field holds."""
    return 1 if isinstance(text, str) else len(text)


def prompts_of(text: str | list[str], config: AppConfig, param: str = "text") -> list[str]:
    """The prompts of a request, checked against ``max_user_batch_size`` and ``max_prompt_string_bytes``."""
    prompts = [text] if isinstance(text, str) else text
    check_batch([utf8_size(prompt) for prompt in prompts], config, single=isinstance(text, str), param=param)
    return prompts


def _schema_text(schema: object) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"json_schema is a string but not JSON: {exc}", param="json_schema") from None
        return schema
    return json.dumps(schema)


def generation_params(body: GenerateRequest) -> GenerationParams:
    """Decoding parameters, with Takeoff's defaults where the request says null."""
    defaults = GenerationParams()
    return GenerationParams(
        max_new_tokens=body.max_new_tokens if body.max_new_tokens is not None else defaults.max_new_tokens,
        min_new_tokens=body.min_new_tokens or 0,
        temperature=body.sampling_temperature if body.sampling_temperature is not None else defaults.temperature,
        top_k=body.sampling_topk if body.sampling_topk is not None else defaults.top_k,
        top_p=body.sampling_topp if body.sampling_topp is not None else defaults.top_p,
        repetition_penalty=body.repetition_penalty or defaults.repetition_penalty,
        no_repeat_ngram_size=body.no_repeat_ngram_size or 0,
        prompt_max_tokens=body.prompt_max_tokens,
        regex_string=body.regex_string,
        json_schema=_schema_text(body.json_schema),
        constrained_decoding_backend=body.constrained_decoding_backend,
        lora_id=body.lora_id,
        use_chat_template=bool(body.use_chat_template),
        return_metadata=bool(body.return_metadata),
    )


def generate_frames(body: GenerateRequest, config: AppConfig) -> list[RequestFrame]:
    """One request frame per prompt, all for the same consumer group."""
    if body.image_paths:
        raise NotSupportedError(
            "image_paths: this server has no image input yet (no reader takes images); send text only",
            param="image_paths",
        )
    prompts = prompts_of(body.text, config)
    params = generation_params(body)
    if params.min_new_tokens > params.max_new_tokens:
        raise InvalidRequestError(
            f"min_new_tokens ({params.min_new_tokens}) is more than max_new_tokens ({params.max_new_tokens})",
            param="min_new_tokens",
        )
    group = body.consumer_group or DEFAULT_GROUP
    return [
        RequestFrame(request_id=new_request_id(), consumer_group=group, text=prompt, params=params)
        for prompt in prompts
    ]


# ---- answers ----------------------------------------------------------------------------------------------------


def metadata(frame: FinalFrame) -> dict[str, Any]:
    """A prompt's ``metadata`` (``return_metadata``): its token counts, why it ended, which reader ran it."""
    return {
        "prompt_tokens": frame.prompt_tokens,
        "completion_tokens": frame.completion_tokens,
        "finish_reason": frame.finish_reason,
        "reader_id": frame.reader_id,
    }


def generate_answer(body: GenerateRequest, texts: list[list[str]], finals: list[FinalFrame | None]) -> dict[str, Any]:
    """``/generate``'s answer: the text (a list for a list of prompts), and the metadata when asked for."""
    joined = ["".join(parts) for parts in texts]
    result: dict[str, Any] = {"text": joined[0] if isinstance(body.text, str) else joined}
    if body.return_metadata:
        metas = [metadata(final) for final in finals if final is not None]
        result["metadata"] = metas[0] if isinstance(body.text, str) else metas
    return result


class NativeEvents:
    """``/generate_stream``'s server-sent events: one per token; ``{"text", "batch_id"}`` events for a list of
    prompts; ``event: metadata`` with ``return_metadata``; a prompt's error is an ``event: error`` and the other
    prompts of a list go on."""

    __slots__ = ("batch", "metadata")

    def __init__(self, body: GenerateRequest) -> None:
        self.batch = not isinstance(body.text, str)
        self.metadata = bool(body.return_metadata)

    def opening(self) -> str:
        return ""

    def frames(self, items: list[Item]) -> tuple[str, LiftoffError | None]:
        return "".join(self._render(item) for item in items), None

    def _render(self, item: Item) -> str:
        frame = item.frame
        if isinstance(frame, TokenFrame):
            if not frame.text:
                return ""
            if self.batch:
                return sse_event(msgspec.json.encode({"text": frame.text, "batch_id": item.index}).decode())
            return sse_event(frame.text)
        if isinstance(frame, FinalFrame):
            if not self.metadata:
                return ""
            meta = metadata(frame) | ({"batch_id": item.index} if self.batch else {})
            return sse_event(msgspec.json.encode(meta).decode(), event="metadata")
        if not isinstance(frame, ErrorFrame):
            return ""
        error = {"detail": frame.message, "error_type": frame.error_type}
        return sse_event(msgspec.json.encode(error | self._where(item.index)).decode(), event="error")

    def _where(self, index: int) -> dict[str, int]:
        return {"batch_id": index} if self.batch else {}

    def error(self, exc: LiftoffError) -> str:
        return sse_event(msgspec.json.encode({"detail": exc.message, "error_type": exc.error_type}).decode(), "error")

    def closing(self) -> str:
        return ""
