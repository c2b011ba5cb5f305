"""API readers in front of llama.cpp's ``llama-server`` serving the bundled SmolLM2 (a real engine on loopback).

Greedy decoding gives the upstream's own tokens, chunk for chunk; a group mixes a local and an API reader; killing
the upstream mid-stream ends the stream with a clean error and the reader comes back with it; a client that leaves
frees the upstream's slot; tokenizer services and structured output go to the upstream's own routes.

llama-server's greedy text can depend on its prompt cache (a cached prefix re-decodes only the last prompt token,
with other rounding; docs/offline-models.md §2a), so every comparison warms the cache with the same prompt first.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from liftoff.backends.api.backend import ApiBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.types import GenerationParams
from liftoff.reader.relay import Relay
from tests.helpers import LiftoffServer, sse_events, wait_until
from tests.llama_server import LlamaServer

QUESTION = "Name three colours of the rainbow."
MODEL = "smollm2"


def upstream_stream(server: LlamaServer, body: dict[str, Any], path: str = "/chat/completions") -> list[str]:
    """The text pieces of llama-server's own stream, one per event."""
    pieces = []
    with server.http.stream("POST", server.base + path, json={**body, "stream": True}) as response:
        for _, data in sse_events(response.iter_lines()):
            if data == "[DONE]":
                break
            choices = json.loads(data)["choices"]
            if choices:
                piece = choices[0]["delta"].get("content") if "delta" in choices[0] else choices[0]["text"]
                if piece:
                    pieces.append(piece)
    return pieces


def relayed(server: LlamaServer, text: str, params: GenerationParams) -> list[Any]:
    """The frames an API reader's relay emits for one request (in this process, no gateway in between)."""
    backend = ApiBackend(ReaderConfig(model_name=MODEL, device="api", api_base=server.base))
    backend.load(lambda _: None)
    frames: list[Any] = []
    done = threading.Event()

    def emit(batch: list[Any]) -> None:
        frames.extend(batch)
        if any(isinstance(frame, FinalFrame | ErrorFrame) for frame in batch):
            done.set()

    relay = Relay(backend, emit, "api")
    relay.start()
    try:
        relay.submit(RequestFrame(request_id="r1", consumer_group="g", text=text, params=params))
        assert done.wait(60), f"no final frame: {frames}"
    finally:
        relay.stop()
    return frames


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_the_relay_streams_the_upstreams_tokens_one_for_one(llama_server: LlamaServer, chat: bool) -> None:
    params = GenerationParams(max_new_tokens=24, use_chat_template=chat)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 24, "temperature": 0.0}
    body |= {"messages": [{"role": "user", "content": QUESTION}]} if chat else {"prompt": QUESTION}
    path = "/chat/completions" if chat else "/completions"
    upstream_stream(llama_server, body, path)  # warm the prompt cache
    expected = upstream_stream(llama_server, body, path)
    frames = relayed(llama_server, QUESTION, params)
    assert [frame.text for frame in frames if isinstance(frame, TokenFrame)] == expected
    assert [frame.seq for frame in frames] == list(range(len(frames)))
    final = frames[-1]
    assert isinstance(final, FinalFrame)
    assert final.completion_tokens == len(expected) == 24
    assert final.finish_reason == "length"
    assert final.prompt_tokens > 0


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, llama_server: LlamaServer) -> Any:
    """A Liftoff whose group ``primary`` is an API reader in front of llama-server, and ``mix`` a local llama.cpp
    reader of the same model beside an API reader."""
    api = {"model_name": MODEL, "device": "api", "api_base": llama_server.base, "max_concurrency": 4}
    local = {"model_name": str(llama_server.gguf), "device": "cpu", "consumer_group": "mix", "max_batch_size": 4,
             "backend_options": {"n_threads": 1}}  # fmt: skip
    server = LiftoffServer(workdir=tmp_path_factory.mktemp("front"), readers={
        "api": api, "api-mix": {**api, "consumer_group": "mix"}, "local": local,
    }, server={"reserved_consumers": ""})  # fmt: skip
    try:
        server.start(timeout=120)
        server.wait_live(3, timeout=120)
        yield server
    finally:
        server.close()


def _coarsens(chunks: list[str], pieces: list[str]) -> bool:
    """Whether every chunk is a run of consecutive pieces (the gateway may join frames that arrive together)."""
    at = 0
    for chunk in chunks:
        joined = ""
        while joined != chunk and at < len(pieces) and len(joined) < len(chunk):
            joined += pieces[at]
            at += 1
        if joined != chunk:
            return False
    return at == len(pieces)


def test_openai_sdk_streams_what_the_upstream_streams(front: LiftoffServer, llama_server: LlamaServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0}
    upstream_stream(llama_server, body)
    pieces = upstream_stream(llama_server, body)
    client = openai.OpenAI(base_url=front.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    options = {"include_usage": True}
    stream = client.chat.completions.create(model="primary", messages=body["messages"], max_tokens=32,
                                            temperature=0, stream=True, stream_options=options)  # fmt: skip
    chunks = list(stream)
    client.close()
    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(texts) == "".join(pieces)
    assert _coarsens(texts, pieces)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == len(pieces)


def test_a_group_of_a_local_and_an_api_reader_uses_both(front: LiftoffServer) -> None:
    def one(index: int) -> str:
        body = {"text": f"Count to {index}.", "consumer_group": "mix", "max_new_tokens": 4, "return_metadata": True}
        response = front.http.post(front.base + "/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return str(response.json()["metadata"]["reader_id"])

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, range(16)))
    assert set(served) == {"local", "api-mix"}, served


def test_structured_output_goes_upstream(front: LiftoffServer) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    body = {"model": "primary", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40,
            "temperature": 0, "response_format": fmt}  # fmt: skip
    answer = front.http.post(front.url("openai_port") + "/v1/chat/completions", json=body, timeout=120).json()
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"])["colour"], str)
    plain = front.generate(QUESTION, json_schema=schema, max_new_tokens=40)  # a completion: llama-server's json_schema
    assert isinstance(json.loads(plain.json()["text"])["colour"], str)


def test_tokenizer_services_are_the_upstreams(front: LiftoffServer, llama_server: LlamaServer) -> None:
    own = llama_server.http.post(llama_server.root + "/tokenize", json={"content": "Hello world", "with_pieces": True})
    pieces = [token["piece"] for token in own.json()["tokens"]]
    ids = [token["id"] for token in own.json()["tokens"]]
    tokens = front.http.post(front.base + "/tokenize/api", json={"text": "Hello world"}).json()
    assert tokens["tokens"] == pieces
    assert front.http.post(front.base + "/detokenize/api", json={"tokens": ids}).json()["text"] == "Hello world"
    conversation = [[{"role": "user", "content": "Hi"}]]
    rendered = front.http.post(front.base + "/chat_template/api", json={"inputs": conversation}).json()
    assert "<|im_start|>user\nHi<|im_end|>" in rendered["messages"][0]


def long_stream(group: str) -> dict[str, Any]:
    """An OpenAI streaming body that cannot end early: 2000 tokens past end-of-sequence (vLLM's ``ignore_eos``,
    which the native API lacks), minutes of tokens on one thread."""
    return {"model": group, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}  # fmt: skip


def test_a_client_that_leaves_frees_the_upstreams_slot(front: LiftoffServer, llama_server: LlamaServer) -> None:
    body = long_stream("primary")
    predicted = llama_server.metric("tokens_predicted_total")
    url = front.url("openai_port") + "/v1/chat/completions"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
        events = sse_events(r.iter_lines())
        for _ in range(3):
            next(events)
        assert llama_server.busy_slots() == 1
    wait_until(lambda: llama_server.busy_slots() == 0, timeout=10, what="llama-server to stop the request")
    assert llama_server.metric("tokens_predicted_total") - predicted < 2000


def test_the_upstream_killed_mid_stream(tmp_path: Path, smollm2_file: Path, llama_server_binary_path: Path) -> None:
    upstream = LlamaServer(smollm2_file, tmp_path / "llama").start()
    api = {"model_name": MODEL, "device": "api", "api_base": upstream.base, "api_timeout_s": 3}
    server = LiftoffServer(workdir=tmp_path / "front", readers={"api": api}, server={"reserved_consumers": ""})
    try:
        server.start()
        url = server.url("openai_port") + "/v1/chat/completions"
        with server.http.stream("POST", url, json=long_stream("primary")) as response:
            events = sse_events(response.iter_lines())
            assert "choices" in json.loads(next(events)[1])
            upstream.kill()
            rest = [data for _, data in events]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "upstream_unavailable"
        wait_until(lambda: "api" in server.readers("dead"), timeout=10, what="the reader to report its upstream")
        assert server.generate(QUESTION, max_new_tokens=2).status_code == 503
        upstream.start()
        wait_until(lambda: "api" in server.readers("live"), timeout=20, what="the reader to come back")
        again = server.generate(QUESTION, max_new_tokens=2)
        assert again.status_code == 200
        assert again.json()["text"]
    finally:
        server.close()
        upstream.close()


def test_embeddings_from_an_upstream_liftoff(tmp_path: Path, minilm: Path) -> None:
    reader = {"model_name": str(minilm), "device": "cpu", "consumer_group": "emb"}
    upstream = LiftoffServer(workdir=tmp_path / "upstream", readers={"emb": reader})
    front = None
    try:
        upstream.start(timeout=120)
        api = {"model_name": "emb", "device": "api", "api_base": upstream.url("openai_port") + "/v1",
               "consumer_group": "emb"}  # fmt: skip
        front = LiftoffServer(workdir=tmp_path / "front", readers={"api": api}).start()
        texts = ["How do I bake bread?", "Stock markets fell sharply today."]
        body = {"model": "emb", "input": texts}
        own = upstream.http.post(upstream.url("openai_port") + "/v1/embeddings", json=body).json()
        via = front.http.post(front.url("openai_port") + "/v1/embeddings", json=body).json()
        assert [item["embedding"] for item in via["data"]] == [item["embedding"] for item in own["data"]]
        assert via["usage"]["prompt_tokens"] == own["usage"]["prompt_tokens"]
        native = front.http.post(front.base + "/embed", json={"text": texts, "consumer_group": "emb"}).json()
        assert native["result"] == [item["embedding"] for item in own["data"]]
    finally:
        if front is not None:
            front.close()
        upstream.close()
