"""No request hurts another (issue 14), on the bundled SmolLM2 served by llama.cpp: while a long stream runs, every
hostile input is sent, one by one; each gets its answer or its 400, the stream finishes intact, the reader stays
the same process, and a normal request afterwards is answered at once."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.helpers import LiftoffServer, sse_events

LONG = 500  # tokens of the neighbour stream: it must outlast the hostile inputs
HUGE = 18446744073709551621


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    reader = {
        "model_name": "smollm2-135m-instruct",
        "device": "cpu",
        "max_batch_size": 6,
        "max_sequence_length": 1024,
        "backend_options": {"n_threads": 1},
    }
    strict = {**reader, "consumer_group": "strict", "grammar_compile_timeout_s": 0.05, "max_batch_size": 2}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("neighbours"), readers={"smol": reader, "strict": strict})
    instance.start(timeout=120)
    instance.wait_live(2, timeout=120)
    yield instance
    instance.close()


class Stream:
    """A long greedy stream on a thread: its text pieces, its end, and any error event."""

    def __init__(self, server: Any, tokens: int = LONG) -> None:
        self.body = {
            "text": "Tell me a long story about a lighthouse keeper.",
            "use_chat_template": True,
            "max_new_tokens": tokens,
            "min_new_tokens": tokens,
            "return_metadata": True,
        }
        self.url = server.base + "/generate_stream"
        self.pieces: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client, client.stream("POST", self.url, json=self.body) as response:
            for event, data in sse_events(response.iter_lines()):
                self.events.append((event, data))
                if event == "message":
                    self.pieces.append(data)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> dict[str, Any]:
        self.thread.join(120)
        assert not self.running
        assert [event for event, _ in self.events if event not in ("message", "metadata")] == [], self.events[-3:]
        meta: dict[str, Any] = json.loads(self.events[-1][1])
        return meta


def _status(expected: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert response.status_code == expected, response.text[:500]

    return check


def _hostile(server: Any) -> list[tuple[str, Callable[[], httpx.Response], Callable[[httpx.Response], None]]]:
    """Every hostile input of issue 14: (what, send it, check its answer)."""
    post, openai = server.http.post, server.url("openai_port")
    big_schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**6}}}
    deep = json.dumps({"type": "array", "items": {}}).replace("{}", "[" * 5000 + "]" * 5000)
    chat = {"model": "primary", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    return [
        ("huge max_new_tokens", lambda: server.generate("x", max_new_tokens=HUGE), _status(400)),
        (
            "tiny temperature",
            lambda: server.generate("Hi", sampling_temperature=1e-40, sampling_topk=0, max_new_tokens=8),
            _status(200),
        ),
        (
            "tiny temperature, OpenAI, negative seed",
            lambda: post(openai + "/v1/chat/completions", json={**chat, "temperature": 1e-30, "seed": -7}),
            _status(200),
        ),
        (
            "huge repetition penalty",
            lambda: server.generate("Hi", repetition_penalty=100.0, max_new_tokens=8),
            _status(200),
        ),
        (
            "long no-repeat n-grams",
            lambda: server.generate("Hi", no_repeat_ngram_size=32, max_new_tokens=8),
            _status(200),
        ),
        ("grammar bomb", lambda: server.generate("Hi", json_schema=big_schema), _status(400)),
        ("regex bomb", lambda: server.generate("Hi", regex_string="a{0,100000}"), _status(400)),
        (
            "deeply nested schema",
            lambda: post(server.base + "/generate", content=b'{"text": "x", "json_schema": ' + deep.encode() + b"}"),
            _status(400),
        ),
        (
            "grammar over the compile budget",
            lambda: server.generate("Hi", consumer_group="strict", json_schema={"type": "string", "maxLength": 900}),
            _status(400),
        ),
        (
            "long stop strings",
            lambda: post(openai + "/v1/chat/completions", json={**chat, "stop": ["\u2603" * 1024] * 4}),
            _status(200),
        ),
        (
            "megabyte stop string",
            lambda: post(openai + "/v1/chat/completions", json={**chat, "stop": "x" * 10**6}),
            _status(400),
        ),
        ("unknown group", lambda: server.generate("x", consumer_group="g" * 100_000), _status(404)),
        ("unknown field", lambda: server.generate("x", max_new_token=3), _status(400)),
        ("image paths", lambda: server.generate("x", image_paths=["/etc/passwd"]), _status(400)),
        ("big tokenize", lambda: post(server.base + "/tokenize/smol", json={"text": "word " * 29_000}), _status(200)),
        (
            "oversized tokenize",
            lambda: post(server.base + "/tokenize/smol", json={"text": "word " * 40_000}),
            _status(400),
        ),
        ("huge token id", lambda: post(server.base + "/detokenize/smol", json={"tokens": [HUGE]}), _status(400)),
        (
            "many Vertex instances",
            lambda: post(server.url("vertex_port") + "/generate_vertex", json={"instances": [{"text": "x"}] * 1001}),
            _status(400),
        ),
        (
            "non-finite temperature",
            lambda: post(server.base + "/generate", content=b'{"text": "x", "sampling_temperature": NaN}'),
            _status(400),
        ),
        ("client that leaves mid-stream", lambda: _leave_mid_stream(server), _status(200)),
    ]


def _leave_mid_stream(server: Any) -> httpx.Response:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", server.base + "/generate_stream", json={"text": "Count to a hundred.", "max_new_tokens": 200}
        ) as response,
    ):
        for _ in response.iter_lines():
            break
        return response


def test_a_stream_survives_every_hostile_input(server: Any) -> None:
    pid = server.readers()["smol"]["pids"]
    stream = Stream(server)
    for what, send, check in _hostile(server):
        check(send())
        assert stream.running, f"the neighbour stream ended before '{what}' was tried: make LONG longer"
    meta = stream.finish()
    assert (meta["completion_tokens"], meta["finish_reason"]) == (LONG, "length")
    assert server.readers()["smol"]["pids"] == pid
    assert server.status()["status"]["dead_readers"] == {}
    after = server.http.post(server.base + "/generate", json={"text": "Say hi.", "max_new_tokens": 8}, timeout=10)
    assert after.status_code == 200


def test_a_slow_grammar_compiles_while_other_streams_flow(server: Any) -> None:
    stream = Stream(server, tokens=LONG)
    while not stream.pieces:
        stream.thread.join(0.05)
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 400}}, "required": ["note"]}
    body = {"text": "Write a note.", "json_schema": schema, "max_new_tokens": 16}
    before = len(stream.pieces)
    with server.http.stream("POST", server.base + "/generate_stream", json=body) as response:
        assert response.status_code == 200  # answered at its first token: after its grammar compiled (seconds)
        during = len(stream.pieces) - before
        assert stream.running, "the neighbour stream ended before the grammar compiled: make LONG longer"
        text = "".join(data for _, data in sse_events(response.iter_lines()))
    assert text.startswith('{"note": "'), text
    stream.finish()
    assert during >= 5, f"the neighbour got {during} pieces while the grammar compiled: the engine was held"


def test_what_was_refused_says_what_to_do(server: LiftoffServer) -> None:
    bomb = server.generate("Hi", json_schema={"type": "string", "maxLength": 5000}).json()
    assert "max_grammar_repetition (1000)" in bomb["detail"]
    slow = server.generate("Hi", consumer_group="strict", json_schema={"type": "string", "maxLength": 800}).json()
    assert "grammar_compile_timeout_s" in slow["detail"]
