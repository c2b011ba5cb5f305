"""The API backend's pure mappings: core requests → upstream bodies per dialect, and upstream answers → core.

Every core field is either sent in the upstream's spelling or refused with a 400 naming it; nothing is dropped.
"""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest

from liftoff.backends.api.client import UpstreamSettings, label_of, redact
from liftoff.backends.api.dialects import (
    DIALECTS,
    UNBOUNDED_TOKENS,
    UpstreamCall,
    detect_dialect,
    dialect_named,
    generation_call,
)
from liftoff.backends.api.wire import (
    Chunk,
    client_error,
    embedding_rows,
    error_message,
    parse_event,
    retry_after_s,
    share_tokens,
    stream_error,
)
from liftoff.core.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    NotFoundError,
    NotSupportedError,
    ReaderDiedError,
    UpstreamError,
)
from liftoff.core.types import FinishReason, GenerationParams

UP = "http://gpu:8000/v1"


def call(dialect: str, text: str = "Hi", **params: Any) -> UpstreamCall:
    return generation_call("m", text, GenerationParams(**params), DIALECTS[dialect], UP)


# ---- requests ---------------------------------------------------------------------------------------------------


def test_a_plain_prompt_is_a_streamed_completion_and_greedy_is_temperature_zero() -> None:
    made = call("openai", max_new_tokens=5)
    assert made.path == "/completions"
    assert not made.chat
    assert made.body == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "prompt": "Hi",
                         "max_tokens": 5, "temperature": 0.0}  # fmt: skip


def test_chat_template_and_turns_become_chat_messages() -> None:
    single = call("openai", use_chat_template=True)
    assert single.path == "/chat/completions"
    assert single.body["messages"] == [{"role": "user", "content": "Hi"}]
    turns = call("openai", messages=(("system", "Be brief."), ("user", "Hi")))
    assert turns.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat_only = generation_call("m", "Hi", GenerationParams(), DIALECTS["openai"], UP, chat_only=True)
    assert chat_only.chat


def test_no_max_tokens_means_the_upstreams_default() -> None:
    assert "max_tokens" not in call("openai", max_new_tokens=UNBOUNDED_TOKENS).body


def test_sampling_fields_openai_has() -> None:
    body = call("openai", temperature=0.7, top_k=0, top_p=0.9, seed=3, stop=("\n", "END")).body
    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["seed"] == 3
    assert body["stop"] == ["\n", "END"]
    assert "top_k" not in body


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": 0.7, "top_k": 40}, "top-k"),
        ({"min_new_tokens": 3}, "min_new_tokens"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"regex_string": "[a-z]+"}, "regex_string"),
        ({"prompt_max_tokens": 10}, "prompt_max_tokens"),
        ({"lora_id": "adapter"}, "lora_id"),
        ({"running_counts": True}, "continuous_usage_stats"),
        ({"json_schema": '{"type": "object"}'}, "json_schema"),  # OpenAI's completions have no response_format
        ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
        ({"constrained_decoding_backend": "outlines"}, "constrained_decoding_backend"),
    ],
)
def test_openai_dialect_refuses_what_openai_lacks(fields: dict[str, object], named: str) -> None:
    with pytest.raises(NotSupportedError, match=named) as info:
        call("openai", **fields)
    assert info.value.status == 400
    assert UP in info.value.message


def test_vllm_takes_its_extensions() -> None:
    body = call("vllm", temperature=0.5, top_k=40, min_new_tokens=2, repetition_penalty=1.1, ignore_eos=True,
                regex_string="[0-9]+", prompt_max_tokens=100, lora_id="sql", running_counts=True).body  # fmt: skip
    assert body["top_k"] == 40
    assert body["min_tokens"] == 2
    assert body["repetition_penalty"] == 1.1
    assert body["ignore_eos"] is True
    assert body["structured_outputs"] == {"regex": "[0-9]+"}
    assert body["truncate_prompt_tokens"] == 100
    assert body["model"] == "sql"
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_json_schema_per_dialect_and_endpoint() -> None:
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    chat = call("openai", json_schema=schema, use_chat_template=True).body
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": json.loads(schema)}}  # fmt: skip
    assert call("vllm", json_schema=schema).body["structured_outputs"] == {"json": json.loads(schema)}
    assert call("llama-server", json_schema=schema).body["json_schema"] == json.loads(schema)
    with pytest.raises(NotSupportedError):
        call("liftoff", json_schema=schema)  # Liftoff's completions endpoint has no response_format


def test_llama_server_repetition_penalty_covers_the_whole_text() -> None:
    body = call("llama-server", repetition_penalty=1.3).body
    assert body["repeat_penalty"] == 1.3
    assert body["repeat_last_n"] == -1
    with pytest.raises(NotSupportedError, match="min_new_tokens"):
        call("llama-server", min_new_tokens=1)


def test_dialect_from_the_model_list() -> None:
    def models(owner: str) -> dict[str, object]:
        return {"data": [{"id": "other", "owned_by": "x"}, {"id": "m", "owned_by": owner}]}

    assert detect_dialect(models("llamacpp"), "m").name == "llama-server"
    assert detect_dialect(models("vllm"), "m").name == "vllm"
    assert detect_dialect(models("liftoff"), "m").name == "liftoff"
    assert detect_dialect(models("openai"), "m").name == "openai"
    assert detect_dialect({"data": [{"id": "a", "owned_by": "sglang"}]}, "m").name == "sglang"  # first entry
    assert detect_dialect({}, "m").name == "openai"
    with pytest.raises(ValueError, match="unknown API dialect 'tgi'"):
        dialect_named("tgi")


# ---- answers ----------------------------------------------------------------------------------------------------


def test_stream_events() -> None:
    chat = '{"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}'
    assert parse_event(chat, chat=True) == Chunk("Hel")
    done = '{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}'
    assert parse_event(done, chat=False) == Chunk("", FinishReason.LENGTH)
    usage = '{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}'
    assert parse_event(usage, chat=True) == Chunk("", None, 7, 3)
    assert parse_event("[DONE]", chat=True) is None
    with pytest.raises(UpstreamError, match="not JSON"):
        parse_event("{oops", chat=True)


def test_an_error_event_keeps_a_liftoff_upstreams_error_type() -> None:
    with pytest.raises(ReaderDiedError):
        parse_event('{"error": {"message": "gone", "type": "server_error", "code": "reader_died"}}', chat=True)
    assert isinstance(stream_error({"message": "boom", "code": 500}), UpstreamError)


def test_error_bodies_and_statuses() -> None:
    assert error_message(b'{"error": {"message": "bad model", "code": 404}}') == "bad model"
    assert error_message(b'{"object": "error", "message": "too long"}') == "too long"
    assert error_message(b'{"detail": "nope"}') == "nope"
    assert error_message(b"plain text") == "plain text"
    assert isinstance(client_error(404, "no such model", UP), NotFoundError)
    assert isinstance(client_error(400, "maximum context length is 2048", UP), ContextLengthExceededError)
    bad = client_error(422, "x", UP)
    assert isinstance(bad, InvalidRequestError)
    assert "from upstream http://gpu:8000/v1" in bad.message
    refused = client_error(401, "invalid key", UP)
    assert isinstance(refused, UpstreamError)
    assert refused.status == 502
    assert retry_after_s("2") == 2.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_embedding_rows_follow_the_index_field() -> None:
    answer = {"data": [{"index": 1, "embedding": [3.0, 4.0]}, {"index": 0, "embedding": [1.0, 2.0]}]}
    rows = embedding_rows(answer, 2)
    assert array("f", rows[0]).tolist() == [1.0, 2.0]
    assert array("f", rows[1]).tolist() == [3.0, 4.0]
    with pytest.raises(UpstreamError, match="1 embeddings for 2 inputs"):
        embedding_rows({"data": [{"embedding": [1.0]}]}, 2)


def test_shared_token_counts_add_up() -> None:
    assert share_tokens(7, ["only one"]) == [7]
    counts = share_tokens(10, ["a", "bbbb", "cc"])
    assert sum(counts) == 10
    assert counts[1] > counts[2] > counts[0]


def test_keys_never_leave_in_messages() -> None:
    settings = UpstreamSettings(base="https://user:pw@api.example.com/v1", key="sk-secret", headers={"x-k": "hv"})
    assert settings.request_headers() == {"x-k": "hv", "Authorization": "Bearer sk-secret"}
    assert settings.root == "https://user:pw@api.example.com"
    assert label_of(settings.base) == "https://api.example.com/v1"
    assert redact("bad key sk-secret and hv", ("sk-secret", "hv")) == "bad key *** and ***"
