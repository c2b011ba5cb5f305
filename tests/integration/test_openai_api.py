"""The OpenAI-compatible port over raw HTTP: response bodies, SSE bytes, usage and every error body."""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import httpx
import pytest

from tests.helpers import LiftoffServer, echo_reader, wait_until

CHUNK_HEAD = '"id":"ID","object":"chat.completion.chunk","created":0,"model":"primary"'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    readers = {"r1": echo_reader(), "r2": echo_reader("broken", fail_load="no model here")}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("openai"), readers=readers,
                             server={"body_size_limit_bytes": 4096, "max_user_batch_size": 8})  # fmt: skip
    instance.start()
    yield instance
    instance.close()


def post(server: Any, path: str, body: Any) -> Any:
    return server.http.post(server.url("openai_port") + path, json=body)


def chat(server: Any, content: str = "one two three", **fields: Any) -> Any:
    body = {"model": "primary", "messages": [{"role": "user", "content": content}], **fields}
    return post(server, "/v1/chat/completions", body)


def normalized(text: str) -> str:
    """The stream with its id and timestamp replaced, so its bytes can be compared."""
    text = re.sub(r'"id":"(chatcmpl|cmpl)-[0-9a-f]{32}"', '"id":"ID"', text)
    return re.sub(r'"created":\d+', '"created":0', text)


def events(response: Any) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    raw = response.text
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")[:-2]
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), raw
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


def test_models_lists_groups_with_a_live_reader(server: Any) -> None:
    response = server.http.get(server.url("openai_port") + "/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["primary"]  # "broken" has no live reader
    assert set(body["data"][0]) == {"id", "object", "created", "owned_by"}
    one = server.http.get(server.url("openai_port") + "/v1/models/primary")
    assert one.json() == body["data"][0]
    error(server.http.get(server.url("openai_port") + "/v1/models/broken"), 404, "model", "not_found", "'broken'")


def test_chat_completion_body_and_usage(server: Any) -> None:
    response = chat(server)
    assert response.status_code == 200
    body = response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body.pop("id"))
    assert isinstance(body.pop("created"), int)
    text = "user: one two three\nassistant:"  # the echo model repeats its chat-templated prompt
    assert body == {
        "object": "chat.completion",
        "model": "primary",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "text": text,
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }  # fmt: skip


def test_chat_stream_bytes_with_usage(server: Any) -> None:
    response = chat(server, max_tokens=1, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    head = CHUNK_HEAD + ',"usage":null'
    assert normalized(response.text) == (
        f'data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
        '"finish_reason":null}]}\n\n'
        f'data: {{{head},"choices":[{{"index":0,"delta":{{"content":"user:"}},"logprobs":null,'
        '"finish_reason":null}]}\n\n'
        f'data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}]}}\n\n'
        f'data: {{{CHUNK_HEAD},"usage":{{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}},'
        '"choices":[]}\n\n'
        "data: [DONE]\n\n"
    )


def test_continuous_usage_stats_put_running_counts_in_every_chunk(server: Any) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}  # what GuideLLM sends
    body = {"model": "primary", "prompt": "hello", "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": options}  # fmt: skip
    chunks = events(post(server, "/v1/completions", body))
    counts = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"], c["usage"]["total_tokens"])
              for c in chunks]  # fmt: skip
    texts = [chunk["choices"][0]["text"] for chunk in chunks[:-1]]
    assert "".join(texts) == "hellohellohello"
    assert counts[-2:] == [(1, 3, 4), (1, 3, 4)]  # the finish chunk, then the usage chunk
    assert counts[0][:1] == (1,)
    assert [count[1] for count in counts] == sorted(count[1] for count in counts)
    assert chunks[-1]["choices"] == []


def test_benchmark_tool_shaped_chat_requests(server: Any) -> None:
    """The bodies GuideLLM and ``vllm bench serve --backend openai-chat`` send for fixed-length loads."""
    guidellm = {"model": "primary", "stream": True, "max_completion_tokens": 4, "stop": None, "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}]}]}  # fmt: skip
    vllm_bench = {"model": "primary", "stream": True, "temperature": 0.0, "max_completion_tokens": 4,
                  "ignore_eos": True, "stream_options": {"include_usage": True},
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}]}]}  # fmt: skip
    for body in (guidellm, vllm_bench):
        chunks = events(post(server, "/v1/chat/completions", body))
        text = "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"])
        assert text == "user: one two\nassistant:"
        assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


def test_chat_stream_chunks_carry_id_object_created_model_and_rebuild_the_text(server: Any) -> None:
    chunks = events(chat(server, "a b c d e f", stream=True, n=2))
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], "chat.completion.chunk", chunks[0]["created"], "primary")
    }
    assert all("usage" not in chunk for chunk in chunks)
    for index in (0, 1):
        mine = [choice for chunk in chunks for choice in chunk["choices"] if choice["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(choice["delta"].get("content", "") for choice in mine) == "user: a b c d e f\nassistant:"
        assert [choice["finish_reason"] for choice in mine][-1] == "stop"
        assert mine[-1]["delta"] == {}
    assert all(len(chunk["choices"]) == 1 for chunk in chunks[1:])


def test_completion_stream_bytes(server: Any) -> None:
    body = {"model": "primary", "prompt": "hello", "stream": True}
    response = post(server, "/v1/completions", body)
    head = CHUNK_HEAD.replace("chat.completion.chunk", "text_completion")
    assert normalized(response.text) == (
        f'data: {{{head},"choices":[{{"index":0,"text":"hello","logprobs":null,"finish_reason":null}}]}}\n\n'
        f'data: {{{head},"choices":[{{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}}]}}\n\n'
        "data: [DONE]\n\n"
    )


def test_completions_of_a_prompt_list_with_n(server: Any) -> None:
    body = {"model": "primary", "prompt": ["a b c", "d"], "n": 2, "max_tokens": 2}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200
    result = response.json()
    assert result["object"] == "text_completion"
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", result["id"])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in result["choices"]] == [
        (0, "a b", "length"), (1, "a b", "length"), (2, "d", "stop"), (3, "d", "stop")
    ]  # fmt: skip
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_stop_strings_are_not_returned_and_end_the_generation(server: Any) -> None:
    body = {"model": "primary", "prompt": "alpha beta gamma delta", "stop": [" gam", "zzz"], "max_tokens": 50}
    result = post(server, "/v1/completions", body).json()
    assert (result["choices"][0]["text"], result["choices"][0]["finish_reason"]) == ("alpha beta", "stop")
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    chunks = events(chat(server, "alpha beta gamma", stop="beta", stream=True))
    text = "".join(choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"])
    assert text == "user: alpha "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos_and_min_tokens_fix_the_output_length(server: Any) -> None:
    fixed = post(server, "/v1/completions", {"model": "primary", "prompt": "x y", "max_tokens": 7, "ignore_eos": True})
    assert fixed.json()["choices"][0] == {"index": 0, "text": "x yx yx yx", "logprobs": None,
                                          "finish_reason": "length"}  # fmt: skip
    assert fixed.json()["usage"]["completion_tokens"] == 7
    least = post(server, "/v1/completions", {"model": "primary", "prompt": "x y", "max_tokens": 9, "min_tokens": 5})
    assert least.json()["usage"]["completion_tokens"] == 5
    seeded = chat(server, seed=1, temperature=0.3, top_p=0.5, max_completion_tokens=3)
    assert seeded.json()["usage"]["completion_tokens"] == 3


def error(response: Any, status: int, param: str | None, code: str, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["param"], body["error"]["code"]) == (param, code), body
    for word in words:
        assert word in body["error"]["message"], (word, body)
    return body["error"]


def test_unknown_and_unready_models(server: Any) -> None:
    missing = error(chat(server, model="nope"), 404, "model", "not_found", "'nope' does not exist")
    assert missing["type"] == "not_found_error"
    body = {"model": "broken", "messages": [{"role": "user", "content": "x"}]}
    unready = error(post(server, "/v1/chat/completions", body), 503, None, "unavailable", "no live reader")
    assert unready["type"] == "service_unavailable_error"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["tools is not supported"]),
        ({"logprobs": True}, "logprobs", ["logprobs is not supported"]),
        ({"response_format": {"type": "json_object"}}, None, ["echo backend", "cannot follow"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
            "response_format.json_schema.x",
            ["is not a field this server knows"],
        ),
        ({"frequency_penalty": 1.0}, "frequency_penalty", ["frequency_penalty"]),
        ({"store": True}, "store", ["store is not a field this server knows"]),
    ],
)
def test_unsupported_fields_are_400s_naming_them(server: Any, fields: dict[str, Any], param: str, words: Any) -> None:
    found = error(chat(server, **fields), 400, param, "not_supported", *words)
    assert found["type"] == "invalid_request_error"


def test_a_conversation_is_rendered_by_the_readers_chat_template(server: Any) -> None:
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    response = post(server, "/v1/chat/completions", {"model": "primary", "messages": turns, "max_tokens": 50})
    assert response.status_code == 200, response.text
    body = response.json()
    rendered = "system: be brief\nuser: hi\nassistant:"  # the echo backend streams its prompt back
    assert body["choices"][0]["message"]["content"] == rendered
    assert body["usage"]["prompt_tokens"] == len(rendered.split())


def test_images_are_refused_with_the_reason(server: Any) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    response = post(server, "/v1/chat/completions", {"model": "primary", "messages": image})
    error(response, 400, "messages[0].content", "not_supported", "'image_url'")


def test_malformed_bodies_are_400s(server: Any) -> None:
    url = server.url("openai_port") + "/v1/chat/completions"
    error(server.http.post(url, content=b"{nope"), 400, None, "invalid_request", "not valid JSON")
    error(server.http.post(url, json={"model": "primary"}), 400, "messages", "validation_error", "Field required")
    error(chat(server, max_tokens=0), 400, "max_tokens", "invalid_request", "max_tokens is 0", "from 1 to 1048576")
    error(chat(server, seed=1 << 64), 400, "seed", "invalid_request", "seed is", "to 18446744073709551615")
    error(chat(server, n=1000), 400, "n", "invalid_request", "from 1 to 128")
    error(chat(server, stop=["x" * 1025]), 400, "stop.0", "invalid_request", "at most 1024 characters")
    error(chat(server, max_tokens=2, min_tokens=3), 400, "min_tokens", "invalid_request", "more than max_tokens")
    error(chat(server, n=9), 400, "n", "invalid_request", "max_user_batch_size")
    big = server.http.post(url, content=b"x" * 5000)
    error(big, 413, None, "payload_too_large", "body_size_limit_bytes")


def test_embeddings_need_an_embedding_reader(server: Any) -> None:
    response = post(server, "/v1/embeddings", {"model": "primary", "input": ["a", "b"]})
    error(response, 400, "model", "invalid_request", "embeddings need an EMBEDDING reader")
    error(post(server, "/v1/embeddings", {"model": "primary", "input": [[1, 2]]}), 400, "input", "not_supported",
          "token ids")  # fmt: skip
    error(post(server, "/v1/embeddings", {"model": "primary"}), 400, "input", "validation_error")


def test_unknown_routes_answer_in_openai_shape(server: Any) -> None:
    response = server.http.get(server.url("openai_port") + "/v1/nothing")
    error(response, 404, None, "not_found")
    response = server.http.get(server.url("openai_port") + "/v1/chat/completions")
    error(response, 405, None, "method_not_allowed")


def test_every_port_still_serves_healthz(server: Any) -> None:
    assert server.http.get(server.url("openai_port") + "/healthz").status_code == 200
    assert server.http.get(server.url("openai_port") + "/health").status_code == 200  # vLLM's name; GuideLLM asks it


def _active(server: Any, reader_id: str) -> int:
    count: int = server.http.get(server.mgmt + f"/reader/{reader_id}").json()["active_requests"]
    return count


FOREVER = {"model": "primary", "prompt": "on and on", "max_tokens": 100_000, "ignore_eos": True, "stream": True}


def test_reader_death_mid_stream_ends_with_an_error_event_then_done(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=20, batch=1)}).start()
    pid = server.readers()["r1"]["pids"][0]
    url = server.url("openai_port") + "/v1/completions"
    with httpx.stream("POST", url, json=FOREVER, timeout=30) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["text"]
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: ")) == {"error": {
        "message": json.loads(rest[-2].removeprefix("data: "))["error"]["message"],
        "type": "service_unavailable_error", "param": None, "code": "reader_died"}}  # fmt: skip
    assert all(line.startswith('data: {"id":"cmpl-') for line in rest[:-2])


def test_disconnects_and_stop_strings_free_the_reader_slot(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=20, batch=1)}).start()
    url = server.url("openai_port") + "/v1/completions"
    with httpx.stream("POST", url, json=FOREVER, timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(lines).startswith("data: ")
        wait_until(lambda: _active(server, "r1") == 1)
    wait_until(lambda: _active(server, "r1") == 0, what="the reader to free the slot")
    stopped = post(server, "/v1/completions", {**FOREVER, "stream": False, "stop": "and"}).json()
    assert (stopped["choices"][0]["text"], stopped["choices"][0]["finish_reason"]) == ("on ", "stop")
    assert _active(server, "r1") == 0
