"""Internal request and result types: msgspec structs that carry no HTTP or wire-schema concepts.

Surfaces translate their wire bodies into these (``gateway/translate``); readers and backends only ever see
these. They are also what travels inside broker frames (``core/frames.py``).
"""

from __future__ import annotations

import enum

import msgspec


class ModelType(enum.StrEnum):
    """What a reader serves, as reported in ``model_type`` (takeoff-spec §6)."""

    CAUSAL = "CAUSAL"
    EMBEDDING = "EMBEDDING"
    CLASSIFICATION = "CLASSIFICATION"
    IMAGE_TO_TEXT = "IMAGE_TO_TEXT"
    API = "API"


class ReaderState(enum.StrEnum):
    """Lifecycle of a reader as the gateway sees it."""

    LOADING = "loading"
    LIVE = "live"
    DEAD = "dead"


class RequestKind(enum.StrEnum):
    """The kinds of work a reader can be asked to do."""

    GENERATE = "generate"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    CHAT_TEMPLATE = "chat_template"
    EMBED = "embed"
    CLASSIFY = "classify"
    ADD_LORA = "add_lora"  # management: load a LoRA adapter into one reader (payload: name, source, timeout_s)
    REMOVE_LORA = "remove_lora"  # management: take one out (payload: name)


_TOKENIZER = frozenset({RequestKind.TOKENIZE, RequestKind.DETOKENIZE})
# Adapter changes go to generative readers; whether the backend holds adapters is its own answer (a 400 if not).
LORA_KINDS = frozenset({RequestKind.ADD_LORA, RequestKind.REMOVE_LORA})

# The request kinds a reader of each model type can serve (a request of another kind is a client error: 400).
SERVES: dict[str, frozenset[RequestKind]] = {
    ModelType.CAUSAL: _TOKENIZER | LORA_KINDS | {RequestKind.GENERATE, RequestKind.CHAT_TEMPLATE},
    ModelType.IMAGE_TO_TEXT: _TOKENIZER | LORA_KINDS | {RequestKind.GENERATE, RequestKind.CHAT_TEMPLATE},
    ModelType.EMBEDDING: _TOKENIZER | {RequestKind.EMBED},
    ModelType.CLASSIFICATION: _TOKENIZER | {RequestKind.CLASSIFY},
    # An API reader forwards; it answers tokenizer services itself where its upstream offers them (else a 400).
    ModelType.API: _TOKENIZER | {RequestKind.GENERATE, RequestKind.EMBED, RequestKind.CHAT_TEMPLATE},
}

# What each kind of request needs, in words, for error messages.
NEEDS: dict[RequestKind, str] = {
    RequestKind.GENERATE: "generation needs a CAUSAL (text generation) reader",
    RequestKind.EMBED: "embeddings need an EMBEDDING reader",
    RequestKind.CLASSIFY: "classification and reranking need a CLASSIFICATION reader",
    RequestKind.CHAT_TEMPLATE: "chat templates belong to CAUSAL (text generation) readers",
    RequestKind.TOKENIZE: "tokenizing needs a reader with a tokenizer",
    RequestKind.DETOKENIZE: "detokenizing needs a reader with a tokenizer",
    RequestKind.ADD_LORA: "LoRA adapters need a text generation reader of the transformers backend",
    RequestKind.REMOVE_LORA: "LoRA adapters need a text generation reader of the transformers backend",
}


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    ABORTED = "aborted"


class GenerationParams(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True, gc=False):
    """Decoding parameters of one generation (takeoff-spec §2.1.1, with internal names)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    prompt_max_tokens: int | None = None
    regex_string: str | None = None
    json_schema: str | None = None
    constrained_decoding_backend: str | None = None
    lora_id: str | None = None
    use_chat_template: bool = False
    return_metadata: bool = False
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    running_counts: bool = False  # token frames carry the prompt's and the output's token counts so far
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns for the chat template, in place of the text


class ReaderInfo(msgspec.Struct, kw_only=True):
    """What a reader reports about itself; the fields of ``ReaderInfo`` in the management ``/status``."""

    consumer_groups: list[str]
    consumer_name: str
    device: str
    model_name: str
    model_type: str
    pids: list[int]
    loras: str | None = None  # the names of its LoRA adapters, comma-separated (a lora_id picks one)
