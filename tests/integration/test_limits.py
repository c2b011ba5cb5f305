"""Issue 14 over real processes with echo readers: hostile values are 400s, the reader outlives them, and every
limit (connections, slow headers and bodies, queue length, batch size across Vertex and Snowflake) answers with a
documented error instead of hanging or taking memory."""

from __future__ import annotations

import concurrent.futures
import socket
from typing import Any

import httpx
import pytest

from tests.helpers import LiftoffServer, echo_reader, wait_until

HUGE = 18446744073709551621  # over 2**64: no broker frame can carry it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    readers = {"r1": echo_reader(), "slow": echo_reader("slow", delay_ms=100, batch=1)}
    limits = {"max_connections": 8, "header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_queued_requests": 2}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("limits"), readers=readers, server=limits)
    instance.start()
    instance.wait_live(2)
    yield instance
    instance.close()


def _pid(server: Any, reader_id: str = "r1") -> int:
    pids: list[int] = server.readers()[reader_id]["pids"]
    return pids[0]


def _refused(response: httpx.Response, *words: str, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    text = body["detail"] if "detail" in body else body["error"]["message"]
    for word in words:
        assert word in text, (word, body)
    return body


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_new_tokens": HUGE}, ("max_new_tokens is 18446744073709551621", "from 1 to 1048576")),
        ({"sampling_topk": HUGE}, ("sampling_topk",)),
        ({"prompt_max_tokens": -1}, ("prompt_max_tokens",)),
        ({"no_repeat_ngram_size": 10**9}, ("no_repeat_ngram_size", "from 0 to 32")),
        ({"sampling_temperature": 1e300}, ("sampling_temperature", "from 0 to 100")),
        ({"repetition_penalty": 0}, ("repetition_penalty", "more than 0")),
        ({"max_new_tokens": 5, "maxnewtokens": 3}, ("maxnewtokens is not a field", "takes: text")),
        ({"image_paths": ["/etc/passwd"]}, ("image_paths", "no image input")),
    ],
)
def test_hostile_generation_fields_are_400s_and_the_reader_lives(server: Any, fields: Any, words: Any) -> None:
    pid = _pid(server)
    _refused(server.generate("x", **fields), *words)
    assert server.generate("still here").json() == {"text": "still here"}
    assert _pid(server) == pid


def test_non_finite_numbers_are_400s(server: Any) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"text": "x", "sampling_temperature": ' + literal + b"}"
        _refused(server.http.post(server.base + "/generate", content=body), "sampling_temperature")


def test_every_surface_bounds_its_numbers(server: Any) -> None:
    openai = server.url("openai_port") + "/v1/completions"
    post = server.http.post
    _refused(post(openai, json={"model": "primary", "prompt": "x", "max_tokens": HUGE}), "max_tokens")
    _refused(post(openai, json={"model": "primary", "prompt": "x", "seed": -(2**70)}), "seed")
    negative = post(openai, json={"model": "primary", "prompt": "x y", "seed": -5, "temperature": 0.5})
    assert negative.status_code == 200, negative.text  # any 64-bit seed is honoured (it was a 500)
    vertex = server.url("vertex_port") + "/generate_vertex"
    _refused(post(vertex, json={"instances": [{"text": "x", "max_new_tokens": HUGE}]}), "instances.0", "max_new_tokens")
    snowflake = server.url("snowflake_port") + "/generate_snowflake"
    cell = post(snowflake, json={"data": [[0, {"text": "x", "max_new_tokens": HUGE}], [1, "ok"]]}).json()["data"]
    assert "max_new_tokens" in cell[0][1]["error"]
    assert cell[1][1] == "ok"
    sagemaker = server.url("sagemaker_port") + "/invocations"
    _refused(post(sagemaker, json={"text": "x", "min_new_tokens": HUGE}), "min_new_tokens")
    _refused(post(server.base + "/detokenize/r1", json={"tokens": [HUGE]}), "tokens.0")
    _refused(post(server.base + "/rerank", json={"query": "q", "documents": ["d"], "top_n": HUGE}), "top_n")
    created = post(server.mgmt + "/reader", json={**echo_reader("big"), "max_batch_size": HUGE})
    _refused(created, "max_batch_size", "from 1 to 1024")
    _refused(post(server.mgmt + "/reader", json={**echo_reader("big"), "max_sequence_length": 10**12}), "max_seq")


def test_tokenizer_routes_take_the_prompt_limits(server: Any) -> None:
    big = "x " * 80_000  # 160 kB: over max_prompt_string_bytes (150 kB), under the body limit
    _refused(server.http.post(server.base + "/tokenize/r1", json={"text": big}), "max_prompt_string_bytes")
    chats = {"inputs": [[{"role": "user", "content": big}]]}
    _refused(server.http.post(server.base + "/chat_template/r1", json=chats), "max_prompt_string_bytes")


def test_unknown_groups_never_become_labels_logs_or_listings(server: Any) -> None:
    forged = "nope\n2026-01-01 00:00:00,000 INFO    [gateway] forged line"
    body = _refused(server.generate("x", consumer_group=forged), "does not exist", status=404)
    assert "slow" not in body["detail"]  # other groups are not listed
    for index in range(3):
        assert server.generate("x", consumer_group=f"made-up-{index}").status_code == 404
    metrics = server.http.get(server.mgmt + "/metrics").text
    assert "made-up" not in metrics
    assert 'consumer_group="unknown"' in metrics
    log = wait_until(lambda: "made-up-2" in server.log() and server.log(), what="the request lines")
    assert "\n2026-01-01 00:00:00,000 INFO    [gateway] forged line" not in log
    assert "forged line" in log  # escaped on the request's own line


def test_a_full_queue_answers_429_with_retry_after(server: Any) -> None:
    body = {"text": "word " * 30, "consumer_group": "slow"}  # 3 s on the one slot of the slow reader
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # one running, one prefetched by the reader, two queued in the gateway (max_queued_requests: 2)
        running = [pool.submit(server.http.post, server.base + "/generate", json=body) for _ in range(4)]
        wait_until(lambda: _metric(server, 'liftoff_requests_waiting{consumer_group="slow"}') == 2, what="a full queue")
        response = server.generate("one more", consumer_group="slow")
        refused = _refused(response, "max_queued_requests", status=429)
        assert refused["error_type"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert all(future.result().status_code == 200 for future in running)
    assert server.generate("after", consumer_group="slow").status_code == 200


def test_slow_headers_get_a_408_and_the_connection_closes(server: Any) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["port"]), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"header_timeout_s" in answer


def test_slow_bodies_get_a_408(server: Any) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["port"]), timeout=10) as sock:
        head = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"content-length: 100\r\n\r\n")  # fmt: skip
        sock.sendall(head + b'{"text": ')
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout_s" in answer


def test_connections_over_the_cap_get_a_503(server: Any) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.ports["openai_port"]), timeout=10) for _ in range(8)]
    try:
        with socket.create_connection(("127.0.0.1", server.ports["openai_port"]), timeout=10) as extra:
            answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b'"error"' in answer  # the OpenAI port's own error shape
        assert b"max_connections" in answer
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: server.http.get(server.url("openai_port") + "/healthz").status_code == 200)


def test_snowflake_stops_generating_when_its_client_leaves(server: Any) -> None:
    before = _metric(server, 'generate_tokens_total{consumer_group="slow"}')
    rows = [[number, {"text": "word " * 20, "consumer_group": "slow"}] for number in range(3)]  # 20 tokens each
    with pytest.raises(httpx.ReadTimeout):
        server.http.post(server.url("snowflake_port") + "/generate_snowflake", json={"data": rows}, timeout=1.0)
    wait_until(lambda: _metric(server, 'liftoff_requests_running{consumer_group="slow"}') == 0, what="idle")
    generated = _metric(server, 'generate_tokens_total{consumer_group="slow"}') - before
    assert generated < 40, f"{generated} tokens: the rows of a client that had left were still generated"


def _metric(server: Any, series: str) -> float:
    for line in server.http.get(server.mgmt + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_reader_survived_everything(server: LiftoffServer) -> None:
    assert set(server.readers()) == {"r1", "slow"}
    assert server.status()["status"]["dead_readers"] == {}
