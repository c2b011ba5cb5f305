"""The OpenAI-compatible surface (port 3003, ``liftoff.gateway.surfaces.openai`` and ``.openai_stream``) in process:
chat completions and completions (buffered and streamed), embeddings, the model list, and errors in OpenAI's shape."""

from __future__ import annotations

import base64
import json
from array import array
from typing import Any

import pytest

from liftoff.core.errors import BackendError, NoReadersAvailableError
from tests.unit.fake_reader import Behaviour, embedding
from tests.unit.inprocess import InProcessGateway, sse_data

CHAT = "/v1/chat/completions"
DONE = "data: [DONE]\n\n"  # the last event of every OpenAI stream


async def call(gateway: InProcessGateway, path: str, body: Any) -> Any:
    async with gateway.client("openai_port") as http:
        return await http.post(path, json=body)


def check_error(response: Any, status: int, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (kind, code)
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of an OpenAI stream, which must end with ``data: [DONE]``."""
    assert text.endswith(DONE)
    events = sse_data(text)
    assert events[-1] == ("message", "[DONE]")
    assert all(event == "message" for event, _ in events)
    return [json.loads(data) for _, data in events[:-1]]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---- chat completions -------------------------------------------------------------------------------------------


async def test_chat_completion(gateway: InProcessGateway) -> None:
    response = await call(gateway, CHAT, {"model": "primary", "messages": user("Hello there friend")})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", "primary")
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there friend"},
            "text": "Hello there friend",
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    [frame] = gateway.broker.submitted
    assert frame.params.use_chat_template is True
    assert frame.params.messages == ()  # one user turn is the plain chat-template prompt


async def test_chat_with_several_turns_and_choices(gateway: InProcessGateway) -> None:
    messages = [{"role": "system", "content": "Be kind"}, *user("a b c")]
    body = {"model": "primary", "messages": messages, "n": 2, "max_tokens": 2, "seed": 7}
    answer = (await call(gateway, CHAT, body)).json()
    assert [choice["message"]["content"] for choice in answer["choices"]] == ["a b", "a b"]
    assert [choice["finish_reason"] for choice in answer["choices"]] == ["length", "length"]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}  # the prompt once
    first, second = gateway.broker.submitted
    assert first.params.messages == (("system", "Be kind"), ("user", "a b c"))
    assert (first.params.seed, second.params.seed) == (7, 8)


async def test_chat_stream(gateway: InProcessGateway) -> None:
    response = await call(gateway, CHAT, {"model": "primary", "messages": user("Hi you"), "stream": True})
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = chunks(response.text)
    assert {event["object"] for event in events} == {"chat.completion.chunk"}
    assert len({event["id"] for event in events}) == 1
    assert all("usage" not in event for event in events)
    deltas = [(event["choices"][0]["delta"], event["choices"][0]["finish_reason"]) for event in events]
    assert deltas[0] == ({"role": "assistant", "content": ""}, None)
    assert "".join(delta.get("content", "") for delta, _ in deltas) == "Hi you"
    assert deltas[-1] == ({}, "stop")


async def test_chat_stream_with_usage(gateway: InProcessGateway) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": "primary", "messages": user("one two"), "stream": True, "stream_options": options}
    events = chunks((await call(gateway, CHAT, body)).text)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    texts = [event for event in events if event["choices"] and event["choices"][0]["delta"].get("content")]
    assert [event["usage"]["completion_tokens"] for event in texts] == list(range(1, len(texts) + 1))
    assert events[0]["usage"] is None  # the role chunk
    assert gateway.broker.submitted[0].params.running_counts is True


async def test_chat_stream_error_after_output(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("it broke"), fail_after=1)
    response = await call(gateway, CHAT, {"model": "primary", "messages": user("a b c"), "stream": True})
    assert response.status_code == 200
    events = chunks(response.text)
    assert events[-1] == {
        "error": {"message": "it broke", "type": "server_error", "param": None, "code": "generation_error"}
    }
    assert events[1]["choices"][0]["delta"] == {"content": "a"}


async def test_chat_stream_error_before_output_is_an_http_error(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=NoReadersAvailableError("gone"))
    response = await call(gateway, CHAT, {"model": "primary", "messages": user("a"), "stream": True})
    check_error(response, 503, "service_unavailable_error", "unavailable")


# ---- completions ------------------------------------------------------------------------------------------------


async def test_completions_of_several_prompts(gateway: InProcessGateway) -> None:
    body = {"model": "primary", "prompt": ["a b c", "d e"], "max_tokens": 2}
    answer = (await call(gateway, "/v1/completions", body)).json()
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["choices"] == [
        {"index": 0, "text": "a b", "logprobs": None, "finish_reason": "length"},
        {"index": 1, "text": "d e", "logprobs": None, "finish_reason": "stop"},
    ]
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert {frame.params.use_chat_template for frame in gateway.broker.submitted} == {False}


async def test_completions_stream(gateway: InProcessGateway) -> None:
    body = {"model": "primary", "prompt": "x y", "stream": True}
    events = chunks((await call(gateway, "/v1/completions", body)).text)
    assert {event["object"] for event in events} == {"text_completion"}
    assert "".join(event["choices"][0]["text"] for event in events) == "x y"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "kind", "code", "param"),
    [
        ({"model": "ghost", "messages": user("hi")}, 404, "not_found_error", "not_found", "model"),
        (
            {"model": "primary", "messages": user("hi"), "tools": [{"type": "function"}]},
            400,
            "invalid_request_error",
            "not_supported",
            "tools",
        ),
        (
            {"model": "primary", "messages": user("hi"), "temperature": 3},
            400,
            "invalid_request_error",
            "invalid_request",
            "temperature",
        ),
        ({"model": "primary", "messages": []}, 400, "invalid_request_error", "validation_error", "messages"),
        ({"model": "primary"}, 400, "invalid_request_error", "validation_error", "messages"),
        (
            {"model": "primary", "messages": [{"role": "tool", "content": "x"}]},
            400,
            "invalid_request_error",
            "not_supported",
            "messages[0].role",
        ),
    ],
)
async def test_bad_chat_requests(
    gateway: InProcessGateway, body: dict[str, Any], status: int, kind: str, code: str, param: str
) -> None:
    check_error(await call(gateway, CHAT, body), status, kind, code, param)
    assert gateway.broker.submitted == []


async def test_malformed_json_is_a_400_in_openai_shape(gateway: InProcessGateway) -> None:
    async with gateway.client("openai_port") as http:
        response = await http.post(CHAT, content=b"{", headers={"content-type": "application/json"})
    check_error(response, 400, "invalid_request_error", "invalid_request")


async def test_completion_options_that_are_not_supported(gateway: InProcessGateway) -> None:
    body = {"model": "primary", "prompt": "hi", "echo": True}
    check_error(await call(gateway, "/v1/completions", body), 400, "invalid_request_error", "not_supported", "echo")


# ---- embeddings -------------------------------------------------------------------------------------------------


@pytest.fixture
async def embedder(gateway: InProcessGateway) -> InProcessGateway:
    gateway.broker.connect("embedder", ("embed",), model_type="EMBEDDING")
    return gateway


async def test_embeddings_of_one_text_carry_takeoffs_result(embedder: InProcessGateway) -> None:
    answer = (await call(embedder, "/v1/embeddings", {"input": "bake bread", "model": "embed"})).json()
    vector = embedding("bake bread", 0)
    assert answer == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": "embed",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
        "truncated": [],
        "result": vector,
    }


async def test_embeddings_as_base64(embedder: InProcessGateway) -> None:
    body = {"input": ["a", "b c"], "model": "embed", "encoding_format": "base64"}
    answer = (await call(embedder, "/v1/embeddings", body)).json()
    assert "result" not in answer
    for index, (item, text) in enumerate(zip(answer["data"], ["a", "b c"], strict=True)):
        values = array("f")
        values.frombytes(base64.b64decode(item["embedding"]))
        assert values.tolist() == embedding(text, index)


async def test_embedding_errors(embedder: InProcessGateway) -> None:
    base = {"model": "embed", "input": "x"}
    check_error(
        await call(embedder, "/v1/embeddings", {**base, "dimensions": 3}),
        400,
        "invalid_request_error",
        "not_supported",
        "dimensions",
    )
    check_error(
        await call(embedder, "/v1/embeddings", {**base, "input": [1, 2]}),
        400,
        "invalid_request_error",
        "not_supported",
        "input",
    )
    check_error(
        await call(embedder, "/v1/embeddings", {**base, "model": "primary"}),
        400,
        "invalid_request_error",
        "invalid_request",
    )
    assert (await call(embedder, "/v1/embeddings", {**base, "dimensions": 4})).status_code == 200


# ---- models -----------------------------------------------------------------------------------------------------


async def test_models_lists_the_groups_with_a_live_reader_and_their_adapters(embedder: InProcessGateway) -> None:
    embedder.broker.connect("loading", ("later",), loaded=False)
    embedder.broker.heartbeat("reader-a", loras="sql,chat")
    async with embedder.client("openai_port") as http:
        listing = (await http.get("/v1/models")).json()
        one = await http.get("/v1/models/primary:sql")
        missing = await http.get("/v1/models/later")
    assert listing["object"] == "list"
    assert [(model["id"], model.get("parent")) for model in listing["data"]] == [
        ("embed", None),
        ("primary", None),
        ("primary:chat", "primary"),
        ("primary:sql", "primary"),
    ]
    assert {(model["object"], model["owned_by"]) for model in listing["data"]} == {("model", "liftoff")}
    assert one.json()["id"] == "primary:sql"
    check_error(missing, 404, "not_found_error", "not_found", "model")


async def test_a_model_naming_an_adapter_sends_its_lora_id(gateway: InProcessGateway) -> None:
    gateway.broker.heartbeat("reader-a", loras="sql")
    for model in ("primary:sql", "sql"):
        assert (await call(gateway, CHAT, {"model": model, "messages": user("hi")})).status_code == 200
    assert [(frame.consumer_group, frame.params.lora_id) for frame in gateway.broker.submitted] == [
        ("primary", "sql"),
        ("primary", "sql"),
    ]
