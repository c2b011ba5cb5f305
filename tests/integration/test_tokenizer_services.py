"""Per-reader tokenize, detokenize and chat template, through raw HTTP and the official client (echo readers)."""

from __future__ import annotations

from typing import Any

from takeoff_client import TakeoffClient

from tests.helpers import echo_reader


def test_tokenizer_services_with_the_official_client(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    client = TakeoffClient(
        base_url="http://127.0.0.1", port=server.ports["port"], mgmt_port=server.ports["management_port"]
    )
    assert client.tokens_count("one two three", "r1") == 3
    assert client.tokenize("one two", "r1", use_chat_template=False) == ["one", " two"]
    assert client.tokenize("hi", "r1") == ["user:", " hi", "\nassistant:"]
    assert client.detokenize(["one", " two"], "r1") == "one two"
    rendered = client.chat_template([{"role": "user", "content": "Hello"}], "r1", add_generation_prompt=True)
    assert rendered == ["user: Hello\nassistant:"]


def test_tokenizer_services_errors(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    post = server.http.post
    missing = post(server.base + "/tokenize/nobody", json={"text": "x"})
    assert missing.status_code == 404
    assert "nobody" in missing.json()["detail"]
    assert post(server.base + "/tokenize/r1", json={}).status_code == 422
    unknown = post(server.base + "/tokenize/r1", json={"txt": "x"})
    assert unknown.status_code == 400
    assert "txt is not a field" in unknown.json()["detail"]
    assert post(server.base + "/chat_template/r1", json={"inputs": []}).status_code == 422
    ids = post(server.base + "/detokenize/r1", json={"tokens": [1, 2]})
    assert ids.status_code == 400
    assert "vocabulary ids" in ids.json()["detail"]
    batch = post(server.base + "/chat_template/r1", json={"inputs": [[{"role": "user", "content": "a"}]] * 2})
    assert batch.json() == {"messages": ["user: a\n", "user: a\n"]}


def test_generate_with_chat_template(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    response = server.generate("Hello", use_chat_template=True, return_metadata=True)
    assert response.json()["text"] == "user: Hello\nassistant:"
    assert response.json()["metadata"]["prompt_tokens"] == 3
