"""Wire schemas of the native inference API (port 3000): ``/generate`` and ``/generate_stream``.

Every optional field accepts an explicit ``null`` (the official client sends them all), meaning "use the
default". Types are strict: a string where a number belongs is an error, not a coercion. Every number has a range
(``liftoff.protocol.limits``) and a field the endpoint does not know is refused with a 400 naming it, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from liftoff.protocol.limits import (
    MAX_CONVERSATIONS,
    MAX_DETOKENIZE_TOKENS,
    MAX_NO_REPEAT_NGRAM,
    MAX_REPETITION_PENALTY,
    MAX_RESULTS,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MAX_TOKENS,
    MAX_TOP_K,
    STRICT,
)


class GenerateRequest(BaseModel):
    """``GenerateRequest`` (takeoff-spec §2.1.1)."""

    model_config = STRICT

    text: str | list[str] = Field(..., description="A prompt, or a list of prompts (a user batch).")
    consumer_group: str | None = Field(None, description="Target consumer group; default 'primary'.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Most tokens to generate (default 128).")
    min_new_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="Fewest tokens before end-of-sequence is allowed."
    )
    sampling_temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description="Temperature (default 1.0); below 1e-5 is greedy."
    )
    sampling_topk: int | None = Field(None, ge=0, le=MAX_TOP_K, description="Top-k; 1 (the default) is greedy.")
    sampling_topp: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (default 1.0).")
    repetition_penalty: float | None = Field(
        None, gt=0, le=MAX_REPETITION_PENALTY, description="Above 1 penalises repeated tokens."
    )
    no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=MAX_NO_REPEAT_NGRAM, description="Forbid repeating n-grams of this size."
    )
    prompt_max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Keep only the last N tokens of the prompt."
    )
    regex_string: str | None = Field(None, description="Constrain the output to this regex.")
    json_schema: dict[str, Any] | bool | str | None = Field(None, description="Constrain the output to this schema.")
    constrained_decoding_backend: str | None = Field(None, description="Structured generation engine.")
    lora_id: str | None = Field(None, description="LoRA adapter to apply.")
    use_chat_template: bool | None = Field(None, description="Wrap the text as a user turn of the chat template.")
    image_paths: list[str] | None = Field(
        None, description="Images for multimodal readers (refused with a 400: this server has no image input yet)."
    )
    return_metadata: bool | None = Field(None, description="Also return token counts.")


class GenerateMetadata(BaseModel):
    """Token counts of a generation (``return_metadata``)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    reader_id: str = Field(..., description="The reader that served the prompt.")


class GenerateResponse(BaseModel):
    """``/generate`` answer: the completion, or one per prompt of a list, in order."""

    text: str | list[str]
    metadata: GenerateMetadata | list[GenerateMetadata] | None = None


_TRUNCATE = "Cut inputs longer than the model takes (true) or refuse them (false); default: the reader's setting."
_METADATA = "Also return token counts and the size of the batch each input ran in."


class EmbedRequest(BaseModel):
    """``POST /embed``."""

    model_config = STRICT

    text: str | list[str] = Field(..., description="A text, or a list of texts.")
    consumer_group: str | None = Field(None, description="Target consumer group; default 'primary'.")
    truncate: bool | None = Field(None, description=_TRUNCATE)
    return_metadata: bool | None = Field(None, description=_METADATA)


class EncodeMetadata(BaseModel):
    """Per-input figures of an embedding or classification request (``return_metadata``)."""

    prompt_tokens: int = Field(..., description="Tokens of all inputs, after truncation.")
    tokens: list[int] = Field(..., description="Tokens of each input, after truncation.")
    batch_sizes: list[int] = Field(..., description="Size of the batch each input ran in (dynamic batching).")


class EmbedResponse(BaseModel):
    """One vector for a text, or one per text of a list."""

    result: list[float] | list[list[float]]
    truncated: list[int] = Field(..., description="Indices of the inputs cut to the model's length.")
    metadata: EncodeMetadata | None = None


class ClassifyRequest(BaseModel):
    """``POST /classify``: texts, or lists of texts joined as sentence pairs by the tokenizer."""

    model_config = STRICT

    text: str | list[str] | list[list[str]] = Field(..., description="A text, a list, or a list of text pairs.")
    consumer_group: str | None = Field(None, description="Target consumer group; default 'primary'.")
    truncate: bool | None = Field(None, description=_TRUNCATE)
    return_metadata: bool | None = Field(None, description=_METADATA)


class ClassifyResponse(BaseModel):
    """One row of raw scores (logits) per input."""

    result: list[list[float]]
    truncated: list[int] = Field(..., description="Indices of the inputs cut to the model's length.")
    metadata: EncodeMetadata | None = None


class RerankDocument(BaseModel):
    """A document given as an object (Cohere's older clients)."""

    model_config = STRICT

    text: str


class RerankRequest(BaseModel):
    """``POST /rerank`` (and ``/v1/rerank``, ``/v2/rerank`` on the OpenAI port): the Cohere and Jina shape."""

    model_config = STRICT

    query: str = Field(..., description="The query every document is scored against.")
    documents: list[str | RerankDocument] = Field(..., min_length=1, description="The documents to rank.")
    top_n: int | None = Field(None, ge=1, le=MAX_RESULTS, description="Return only the best N (default: all).")
    return_documents: bool | None = Field(None, description="Include each document's text (default true).")
    model: str | None = Field(None, description="Consumer group (as on the OpenAI port).")
    consumer_group: str | None = Field(None, description="Consumer group; default 'primary'.")
    truncate: bool | None = Field(None, description=_TRUNCATE)
    rank_fields: list[str] | None = Field(None, description="[Cohere] Not supported: send documents as text.")
    max_chunks_per_doc: int | None = Field(None, description="[Cohere] Not supported: documents are not chunked.")
    max_tokens_per_doc: int | None = Field(None, description="[Cohere] Not supported: see `truncate`.")


class RerankResult(BaseModel):
    """One ranked document."""

    index: int = Field(..., description="Position of the document in the request.")
    relevance_score: float = Field(..., description="Probability of relevance from the cross-encoder's logits.")
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    """Documents by decreasing relevance."""

    id: str
    model: str
    results: list[RerankResult]
    usage: dict[str, int]


class TokenizeRequest(BaseModel):
    """``POST /tokenize/{reader_id}``."""

    model_config = STRICT

    text: str = Field(..., description="The text to tokenize (no batching).")
    use_chat_template: bool | None = Field(None, description="Wrap the text as a user turn of the chat template.")
    skip_special_tokens: bool | None = Field(None, description="Do not add special tokens (BOS) to the tokens.")


class TokenizeResponse(BaseModel):
    """Tokens as vocabulary strings, and their number."""

    tokens: list[str]
    tokens_count: int


class DetokenizeRequest(BaseModel):
    """``POST /detokenize/{reader_id}``."""

    model_config = STRICT

    tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | list[str] = Field(
        ..., max_length=MAX_DETOKENIZE_TOKENS, description="Token ids, or tokens as vocabulary strings."
    )
    skip_special_tokens: bool | None = Field(None, description="Leave special tokens out of the text (default).")


class DetokenizeResponse(BaseModel):
    """The text of the tokens."""

    text: str


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = STRICT

    role: str
    content: str


class ChatTemplateRequest(BaseModel):
    """``POST /chat_template/{reader_id}``: a batch of conversations."""

    model_config = STRICT

    inputs: list[list[ChatMessage]] = Field(
        ..., min_length=1, max_length=MAX_CONVERSATIONS, description="Conversations to render."
    )
    add_generation_prompt: bool | None = Field(None, description="End with the assistant's turn prompt.")


class ChatTemplateResponse(BaseModel):
    """One rendered string per conversation."""

    messages: list[str]


class ErrorBody(BaseModel):
    """Every error of the native, management, Vertex and Snowflake ports."""

    detail: str = Field(..., description="What went wrong, and how to fix it where that is known.")
    error_type: str = Field(..., description="Stable machine-readable kind of error.")
    errors: list[dict[str, Any]] | None = Field(None, description="Each invalid field, for validation errors.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Bad request: malformed JSON, limits exceeded, prompt too long"),
        (404, "Unknown consumer group or reader"),
        (413, "Body larger than body_size_limit_bytes"),
        (422, "Malformed request body: wrong types or missing fields"),
        (429, "Too many queued requests"),
        (503, "No live reader, or the reader died mid-request"),
        (504, "The request did not finish before its deadline"),
    )
}
