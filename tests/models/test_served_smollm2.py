"""The bundled SmolLM2-135M-Instruct served end to end through the llama.cpp backend (real processes)."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest
from takeoff_client import TakeoffClient

from tests.helpers import LiftoffServer, wait_until

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # One llama.cpp thread: two spinning threads on a 2-core machine shared with the test and the gateway stall
    # whenever another process takes a core (docs/benchmarks.md, "Problems seen").
    reader = {"model_name": "smollm2-135m-instruct", "device": "cpu", "max_batch_size": 4, "max_sequence_length": 256,
              "backend_options": {"n_threads": 1}}  # fmt: skip
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("smollm2"), readers={"smol": reader})
    instance.start(timeout=120)
    yield instance
    instance.close()


def _client(server: Any) -> TakeoffClient:
    return TakeoffClient(
        base_url="http://127.0.0.1", port=server.ports["port"], mgmt_port=server.ports["management_port"]
    )


def test_status_reports_a_live_causal_reader(server: Any) -> None:
    info = server.readers()["smol"]
    assert info["model_type"] == "CAUSAL"
    assert info["model_name"] == "smollm2-135m-instruct"
    detail = server.http.get(server.mgmt + "/reader/smol").json()
    assert detail["capacity"] == 4
    assert detail["loading_progress"] == 1.0


def test_generate_and_stream_give_the_same_greedy_text(server: Any) -> None:
    body = {"text": "What is the capital of France?", "use_chat_template": True, "max_new_tokens": 24}
    buffered = server.http.post(server.base + "/generate", json={**body, "return_metadata": True}).json()
    text = buffered["text"]
    assert text.strip()
    assert not any(token in text for token in SPECIAL)
    meta = buffered["metadata"]
    assert meta["reader_id"] == "smol"
    assert 0 < meta["completion_tokens"] <= 24
    assert meta["prompt_tokens"] > 10
    client = _client(server)
    streamed = "".join(event.data for event in client.generate_stream(**body))
    assert streamed == text


def test_generation_stops_at_eos_and_respects_lengths(server: Any) -> None:
    short = server.generate("Say hi.", use_chat_template=True, max_new_tokens=3, return_metadata=True).json()
    assert short["metadata"] == {**short["metadata"], "completion_tokens": 3, "finish_reason": "length"}
    forced = server.generate("Say hi.", use_chat_template=True, min_new_tokens=40, max_new_tokens=40,
                             return_metadata=True).json()  # fmt: skip
    assert forced["metadata"]["completion_tokens"] == 40
    natural = server.generate("Say hi.", use_chat_template=True, max_new_tokens=200, return_metadata=True).json()
    assert natural["metadata"]["finish_reason"] == "stop"
    assert natural["metadata"]["completion_tokens"] < 200


def test_prompt_longer_than_the_context_is_400(server: Any) -> None:
    response = server.generate("word " * 400)
    assert response.status_code == 400
    body = response.json()
    assert body["error_type"] == "context_length_exceeded"
    assert "max_sequence_length is 256" in body["detail"]
    assert "the prompt has 4" in body["detail"]
    kept = server.generate("word " * 400, prompt_max_tokens=20, max_new_tokens=2, return_metadata=True)
    assert kept.status_code == 200
    assert kept.json()["metadata"]["prompt_tokens"] == 20


def test_tokenizer_services_with_the_official_client(server: Any) -> None:
    client = _client(server)
    tokens = client.tokenize("Hello world", "smol", use_chat_template=False)
    assert tokens == ["Hello", "Ġworld"]
    assert client.tokens_count("Hello world", "smol") == 2
    templated = client.tokenize("Hello world", "smol")
    assert templated[0] == "<|im_start|>"
    assert client.detokenize(tokens, "smol") == "Hello world"
    rendered = client.chat_template([{"role": "user", "content": "Hi"}], "smol", add_generation_prompt=True)
    assert rendered[0].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_concurrent_greedy_requests_match_the_same_requests_alone(server: Any) -> None:
    prompts = ["Name a fruit.", "Count to five.", "What colour is the sky?", "Write a haiku about rain."]
    body = {"use_chat_template": True, "max_new_tokens": 16}
    alone = [server.generate(prompt, **body).json()["text"] for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda prompt: server.generate(prompt, **body).json()["text"], prompts))
    assert together == alone


def test_disconnect_frees_the_slot(server: Any) -> None:
    body = {
        "text": "Tell me a very long story.",
        "use_chat_template": True,
        "min_new_tokens": 200,
        "max_new_tokens": 200,
    }
    with httpx.stream("POST", server.base + "/generate_stream", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    wait_until(lambda: server.http.get(server.mgmt + "/reader/smol").json()["active_requests"] == 0, timeout=20)
