"""Native API ↔ core: ``GenerateRequest`` → one :class:`RequestFrame` per prompt, after the gateway's limits."""

from __future__ import annotations

import json

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, NotSupportedError
from liftoff.core.frames import RequestFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import GenerationParams
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
