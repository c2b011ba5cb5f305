"""Every bad input gets a clear JSON error with the right status, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import echo_reader


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers import LiftoffServer

    readers = {"r1": echo_reader(max_sequence_length=16)}
    limits = {"body_size_limit_bytes": 4096, "max_prompt_string_bytes": 1000, "max_user_batch_size": 4}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("bad"), readers=readers, server=limits)
    instance.start()
    yield instance
    instance.close()


def _error(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body["detail"], str)
    assert isinstance(body["error_type"], str)
    for word in words:
        assert word in body["detail"], (word, body)
    return body


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_bad_generate_bodies(server: Any, path: str) -> None:
    url = server.base + path
    post = server.http.post
    _error(post(url, content=b"{not json"), 400, "not valid JSON")
    _error(post(url, content=b""), 400, "not valid JSON")
    _error(post(url, json=["a list"]), 422)
    _error(post(url, json={"consumer_group": "primary"}), 422, "text")
    _error(post(url, json={"text": 5}), 422, "text")
    _error(post(url, json={"text": "hi", "max_new_tokens": "ten"}), 422, "max_new_tokens")
    _error(post(url, json={"text": "hi", "max_new_tokens": 0}), 400, "max_new_tokens", "from 1 to 1048576")
    _error(post(url, json={"text": "hi", "sampling_topp": 1.5}), 400, "sampling_topp", "1.5")
    _error(post(url, json={"text": "hi", "use_chat_template": "yes"}), 422, "use_chat_template")
    _error(post(url, json={"text": []}), 400, "empty")
    _error(post(url, json={"text": ["a"] * 5}), 400, "5 prompts", "max_user_batch_size (4)")
    _error(post(url, json={"text": "é" * 600}), 400, "1200 bytes", "max_prompt_string_bytes (1000)")
    _error(post(url, json={"text": "hi", "min_new_tokens": 9, "max_new_tokens": 3}), 400, "min_new_tokens")
    _error(post(url, json={"text": "hi", "json_schema": "{oops"}), 400, "json_schema")
    body = _error(post(url, json={"text": "x" + " x" * 19}), 400, "20 tokens", "max_sequence_length is 16")
    assert body["error_type"] == "context_length_exceeded"
    _error(post(url, json={"text": "hi", "consumer_group": "ghost"}), 404, "ghost")


def test_oversized_body_is_413(server: Any) -> None:
    big = {"text": "a" * 5000}
    body = _error(server.http.post(server.base + "/generate", json=big), 413, "body_size_limit_bytes (4096)")
    assert body["error_type"] == "payload_too_large"

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    # No content-length: the limit applies while reading.
    _error(server.http.post(server.base + "/generate", content=chunks()), 413)
    _error(server.http.post(server.mgmt + "/reader", json={"model_name": "e" * 5000, "device": "cpu"}), 413)


def test_nulls_mean_defaults(server: Any) -> None:
    fields = {
        "sampling_temperature": None, "sampling_topp": None, "sampling_topk": None, "repetition_penalty": None,
        "no_repeat_ngram_size": None, "max_new_tokens": None, "min_new_tokens": None, "regex_string": None,
        "json_schema": None, "constrained_decoding_backend": None, "return_metadata": None,
        "prompt_max_tokens": None, "consumer_group": None, "lora_id": None, "use_chat_template": None,
        "image_paths": None,
    }  # fmt: skip
    response = server.http.post(server.base + "/generate", json={"text": "nulls are fine", **fields})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "nulls are fine"}


def test_unknown_routes_and_methods(server: Any) -> None:
    _error(server.http.get(server.base + "/nope"), 404)
    _error(server.http.get(server.base + "/generate"), 405)


def test_still_serving_after_bad_input(server: Any) -> None:
    assert server.generate(["one", "two words"]).json() == {"text": ["one", "two words"]}
