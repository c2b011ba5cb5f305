"""Wire schemas of the OpenAI-compatible API (port 3003): chat completions, completions, embeddings.

``model`` names a consumer group. Fields Liftoff does not implement are still declared, so that a request that
sets them can be refused with a 400 naming the field instead of being silently ignored; fields OpenAI does not
define are kept (``extra="allow"``) for the same reason. ``ignore_eos`` and ``min_tokens`` are vLLM's extensions,
which benchmark tools (GuideLLM, ``vllm bench serve``) send to fix output lengths.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from liftoff.protocol.limits import (
    MAX_CHOICES,
    MAX_LOGPROBS,
    MAX_OPENAI_TEMPERATURE,
    MAX_REPETITION_PENALTY,
    MAX_RESULTS,
    MAX_STOP_CHARS,
    MAX_TOKENS,
    MAX_TOP_K,
    SEED_MAX,
    SEED_MIN,
)

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    """``stream_options``."""

    include_usage: bool | None = Field(None, description="Send a last chunk with the token counts.")
    continuous_usage_stats: bool | None = Field(None, description="[vLLM] Token counts so far in every chunk.")


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``: the JSON schema the output follows (as the OpenAI SDK sends it)."""

    name: str | None = Field(None, description="The schema's name (not used).")
    description: str | None = Field(None, description="What the output is for (not used).")
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(_Body):
    """``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ContentPart(_Body):
    """One part of a message's content: ``{"type": "text", "text": ...}`` (images need a multimodal reader)."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    """One turn of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Sampling(_Body):
    """Fields shared by chat completions and completions."""

    model: str = Field(..., description="The consumer group to serve the request.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Most tokens to generate.")
    temperature: float | None = Field(
        None, ge=0, le=MAX_OPENAI_TEMPERATURE, description="Temperature (default 1); below 1e-5 is greedy."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1).")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    stop: StopString | list[StopString] | None = Field(None, description="Up to 4 stop strings; they are not returned.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Seed of the sampler.")
    stream: bool | None = Field(None, description="Stream server-sent events.")
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Not supported unless 0.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Not supported unless 0.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Not supported unless empty."
    )
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(None, description="Not supported.")
    user: str | None = Field(None, description="End-user id; accepted and not used.")
    ignore_eos: bool | None = Field(None, description="[vLLM] Generate max_tokens even past end-of-sequence.")
    min_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="[vLLM] Fewest tokens before end-of-sequence."
    )
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="[vLLM] Top-k; 0 or -1 is off (the default).")
    repetition_penalty: float | None = Field(
        None, gt=0, le=MAX_REPETITION_PENALTY, description="[vLLM] Above 1 penalises repeated tokens."
    )


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation.")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Most tokens to generate (newer name)."
    )
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Not supported.")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    function_call: str | dict[str, Any] | None = Field(None, description="Not supported.")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts.")
    echo: bool | None = Field(None, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Not supported unless 1.")


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str = Field(..., description="The consumer group to serve the request.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text or a list of texts (token-id arrays are refused with a 400: send text)."
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=MAX_RESULTS, description="Must equal the model's own size.")
    user: str | None = None


class ErrorDetail(BaseModel):
    """The ``error`` object of every error on the OpenAI port."""

    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """Every error on the OpenAI port."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Bad request: malformed body, unsupported field, limits exceeded"),
        (404, "Unknown model (consumer group)"),
        (413, "Body larger than body_size_limit_bytes"),
        (429, "Too many queued requests"),
        (503, "No live reader, or the reader died mid-request"),
        (504, "The request did not finish before its deadline"),
    )
}
