"""What an API reader sends upstream: a core generation request mapped onto OpenAI's chat/completions body.

OpenAI-compatible servers share OpenAI's fields and differ in their extensions (top-k, ``min_tokens``, repetition
penalty, regex output, ...). A :class:`Dialect` lists the extensions one kind of server honours; every core field is
then either sent in that server's spelling or refused with a 400 that names it and the upstream, never dropped.
The dialect is found from ``GET /models`` (each engine writes its own name in ``owned_by``) or forced with
``backend_options.dialect``; unknown servers get the strict OpenAI dialect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from liftoff.config.models import DEFAULT_API_BASE
from liftoff.core.errors import NotSupportedError
from liftoff.core.types import GenerationParams

OPENAI_BASE = DEFAULT_API_BASE

# The gateway's "no limit" for chat completions without max_tokens (gateway/translate/openai.py CHAT_MAX_TOKENS):
# upstreams refuse a max_tokens beyond their context, so it is left out and the upstream's own default applies.
UNBOUNDED_TOKENS = 1 << 20

# Extensions beyond OpenAI's fields, by the names used in :class:`Dialect`.
TOP_K = "top_k"
MIN_TOKENS = "min_tokens"
REPETITION = "repetition_penalty"
IGNORE_EOS = "ignore_eos"
REGEX = "regex"
TRUNCATE = "truncate_prompt_tokens"
RUNNING_COUNTS = "continuous_usage_stats"
LORA = "lora"
JSON_COMPLETIONS = "json_on_completions"

# What each extension is called in the requests clients send, for refusals.
_ASKED_AS = {
    TOP_K: "top-k sampling (sampling_topk / top_k above 1)",
    MIN_TOKENS: "min_new_tokens (min_tokens)",
    REPETITION: "repetition_penalty",
    IGNORE_EOS: "ignore_eos",
    REGEX: "regex_string",
    TRUNCATE: "prompt_max_tokens",
    RUNNING_COUNTS: "stream_options.continuous_usage_stats",
    LORA: "lora_id",
    JSON_COMPLETIONS: "json_schema on a prompt without the chat template",
}


@dataclass(frozen=True)
class Dialect:
    """The extensions one kind of OpenAI-compatible server honours, and which tokenizer routes it has."""

    name: str
    extensions: frozenset[str] = frozenset()
    tokenizer: bool = False  # POST /tokenize and /detokenize at the server's root
    chat_template: bool = False  # POST /apply-template (llama-server)

    def require(self, extension: str, upstream: str) -> None:
        """Refuse a request that needs ``extension`` when this server lacks it."""
        if extension not in self.extensions:
            raise NotSupportedError(
                f"{_ASKED_AS[extension]} is not supported by this API reader's upstream ({upstream}, "
                f"{self.name} dialect); leave it out"
            )


_SAMPLING = frozenset({TOP_K, MIN_TOKENS, REPETITION, IGNORE_EOS})
DIALECTS: dict[str, Dialect] = {
    "openai": Dialect("openai"),
    "vllm": Dialect("vllm", _SAMPLING | {REGEX, TRUNCATE, RUNNING_COUNTS, LORA, JSON_COMPLETIONS}, tokenizer=True),
    "sglang": Dialect("sglang", _SAMPLING | {REGEX, JSON_COMPLETIONS}),
    "llama-server": Dialect(
        "llama-server", frozenset({TOP_K, REPETITION, IGNORE_EOS, JSON_COMPLETIONS}), tokenizer=True, chat_template=True
    ),
    "liftoff": Dialect("liftoff", _SAMPLING | {RUNNING_COUNTS}),
}

# ``owned_by`` of ``GET /models`` entries → dialect.
_OWNERS = {"llamacpp": "llama-server", "vllm": "vllm", "sglang": "sglang", "liftoff": "liftoff"}


def dialect_named(name: str) -> Dialect:
    """A dialect by name (``backend_options.dialect``); a clear error for an unknown one."""
    if name not in DIALECTS:
        raise ValueError(f"unknown API dialect {name!r}; choose one of: auto, {', '.join(sorted(DIALECTS))}")
    return DIALECTS[name]


def detect_dialect(models: Any, model_name: str) -> Dialect:
    """The dialect of a server from its ``GET /models`` answer (the entry of ``model_name``, else the first)."""
    entries = models.get("data") if isinstance(models, dict) else None
    if not isinstance(entries, list) or not entries:
        return DIALECTS["openai"]
    entry = next((e for e in entries if isinstance(e, dict) and e.get("id") == model_name), entries[0])
    owner = entry.get("owned_by") if isinstance(entry, dict) else None
    return DIALECTS[_OWNERS.get(str(owner).lower(), "openai")]


def listed_models(models: Any) -> list[str]:
    """The model ids of a ``GET /models`` answer."""
    entries = models.get("data") if isinstance(models, dict) else None
    return [str(e.get("id")) for e in entries or [] if isinstance(e, dict)]


def is_greedy(params: GenerationParams) -> bool:
    """Takeoff's greedy: ``sampling_topk`` 1 (the native default) or temperature 0."""
    return params.top_k == 1 or params.temperature == 0


@dataclass(frozen=True)
class UpstreamCall:
    """One generation request for the upstream: its route (relative to ``api_base``), body, and kind."""

    path: str
    body: dict[str, Any]
    chat: bool


def generation_call(
    model: str, text: str, params: GenerationParams, dialect: Dialect, upstream: str, *, chat_only: bool = False
) -> UpstreamCall:
    """The upstream request of one generation: chat when the request has turns or wants the chat template (or the
    upstream only chats), else a plain completion of the text. Raises :class:`NotSupportedError` for a field the
    upstream lacks."""
    _refuse_unmapped(params, upstream)
    chat = bool(params.messages) or params.use_chat_template or chat_only
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        turns = params.messages or (("user", text),)
        body["messages"] = [{"role": role, "content": content} for role, content in turns]
    else:
        body["prompt"] = text
    if params.max_new_tokens < UNBOUNDED_TOKENS:
        body["max_tokens"] = params.max_new_tokens
    body.update(_sampling(params, dialect, upstream))
    body.update(_structured(params, dialect, upstream, chat=chat))
    _extensions(body, params, dialect, upstream)
    return UpstreamCall("/chat/completions" if chat else "/completions", body, chat)


def _refuse_unmapped(params: GenerationParams, upstream: str) -> None:
    """Fields no OpenAI-compatible server takes."""
    if params.no_repeat_ngram_size:
        raise NotSupportedError(
            f"no_repeat_ngram_size is not supported by API readers (upstream {upstream}); leave it out",
            param="no_repeat_ngram_size",
        )
    if params.constrained_decoding_backend:
        raise NotSupportedError(
            f"constrained_decoding_backend is chosen by the upstream ({upstream}), not per request; leave it out",
            param="constrained_decoding_backend",
        )


def _sampling(params: GenerationParams, dialect: Dialect, upstream: str) -> dict[str, Any]:
    """Temperature, top-p, top-k, seed and stop strings; greedy requests become temperature 0."""
    body: dict[str, Any] = {}
    if is_greedy(params):
        body["temperature"] = 0.0
    else:
        body["temperature"] = params.temperature
        if params.top_p != 1.0:
            body["top_p"] = params.top_p
        if params.top_k > 1:
            dialect.require(TOP_K, upstream)
            body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    return body


def _structured(params: GenerationParams, dialect: Dialect, upstream: str, *, chat: bool) -> dict[str, Any]:
    """``regex_string`` (which wins over a schema, as in Takeoff) and ``json_schema`` in the upstream's spelling."""
    if params.regex_string:
        dialect.require(REGEX, upstream)
        if dialect.name == "vllm":
            return {"structured_outputs": {"regex": params.regex_string}}
        return {"regex": params.regex_string}
    if not params.json_schema:
        return {}
    schema = json.loads(params.json_schema)
    if not chat:
        dialect.require(JSON_COMPLETIONS, upstream)
        if dialect.name == "vllm":
            return {"structured_outputs": {"json": schema}}
        if dialect.name == "llama-server":
            return {"json_schema": schema}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}}


def _extensions(body: dict[str, Any], params: GenerationParams, dialect: Dialect, upstream: str) -> None:
    """min_tokens, repetition penalty, ignore_eos, prompt truncation, LoRA and running token counts."""
    if params.min_new_tokens:
        dialect.require(MIN_TOKENS, upstream)
        body["min_tokens"] = params.min_new_tokens
    if params.repetition_penalty != 1.0:
        dialect.require(REPETITION, upstream)
        if dialect.name == "llama-server":  # its penalty covers the last 64 tokens unless told: make it the whole text
            body.update(repeat_penalty=params.repetition_penalty, repeat_last_n=-1)
        else:
            body["repetition_penalty"] = params.repetition_penalty
    if params.ignore_eos:
        dialect.require(IGNORE_EOS, upstream)
        body["ignore_eos"] = True
    if params.prompt_max_tokens:
        dialect.require(TRUNCATE, upstream)
        body["truncate_prompt_tokens"] = params.prompt_max_tokens
    if params.lora_id:
        dialect.require(LORA, upstream)
        body["model"] = params.lora_id  # vLLM serves each LoRA adapter under its own model name
    if params.running_counts:
        dialect.require(RUNNING_COUNTS, upstream)
        body["stream_options"]["continuous_usage_stats"] = True
