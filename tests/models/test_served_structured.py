"""Structured generation end to end: the bundled SmolLM2 (llama.cpp backend) served over HTTP, asked for JSON and
regex-shaped output through the native API (Takeoff's client) and the OpenAI API (the OpenAI SDK)."""

from __future__ import annotations

import concurrent.futures
import json
import re
from typing import Any

import openai
import pydantic
import pytest
from takeoff_client import TakeoffClient

from tests.helpers import LiftoffServer

pytest.importorskip("xgrammar")

CITY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
}
QUESTION = "Describe the capital of France as JSON."


class Capital(pydantic.BaseModel):
    """What the OpenAI SDK's ``parse`` turns into a strict JSON schema and reads back."""

    city: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


def check_city(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "country", "population_millions"}, text
    assert isinstance(value["city"], str)
    assert isinstance(value["country"], str)
    assert len(value["city"]) <= 30
    assert len(value["country"]) <= 30
    assert isinstance(value["population_millions"], int)
    assert 0 <= value["population_millions"] <= 100


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    reader = {"model_name": "smollm2-135m-instruct", "device": "cpu", "max_batch_size": 4, "max_sequence_length": 512,
              "backend_options": {"n_threads": 1}}  # one thread: see test_served_smollm2.py  # fmt: skip
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("structured"), readers={"smol": reader})
    instance.start(timeout=120)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def sdk(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("openai_port") + "/v1", api_key="anything", max_retries=0)


def test_generate_with_a_json_schema_buffered_and_streamed(server: Any) -> None:
    client = TakeoffClient(base_url="http://127.0.0.1", port=server.ports["port"])
    body = {"use_chat_template": True, "max_new_tokens": 120, "json_schema": CITY}
    buffered = client.generate(QUESTION, **body)["text"]
    check_city(buffered)
    streamed = "".join(event.data for event in client.generate_stream(QUESTION, **body))
    assert streamed == buffered  # greedy: the same text, in pieces


def test_constrained_and_plain_requests_served_together(server: Any) -> None:
    sampled = {"use_chat_template": True, "max_new_tokens": 120, "sampling_temperature": 1.0, "sampling_topk": 0}
    bodies = [{**sampled, "json_schema": CITY} for _ in range(3)] + [sampled]  # the native API has no seed

    def ask(body: dict[str, Any]) -> dict[str, Any]:
        response = server.generate(QUESTION, return_metadata=True, **body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(ask, bodies))
    for answer in answers[:3]:
        assert answer["metadata"]["finish_reason"] == "stop"
        check_city(answer["text"])
    assert answers[3]["text"]


def test_the_regex_wins_and_what_cannot_be_compiled_is_a_400(server: Any) -> None:
    phone = r"\+33 \d \d{2} \d{2} \d{2} \d{2}"
    both = server.generate("The phone number of the Louvre is", regex_string=phone, json_schema=CITY)
    assert both.status_code == 200, both.text
    assert re.fullmatch(phone, both.json()["text"])
    bad = server.generate("x", regex_string="(unclosed")
    assert bad.status_code == 400
    assert bad.json()["error_type"] == "invalid_request"
    assert "regex_string is not a regex that xgrammar can compile" in bad.json()["detail"]
    assert "parenthesis is not closed" in bad.json()["detail"]
    other = server.generate("x", json_schema=CITY, constrained_decoding_backend="outlines")
    assert other.status_code == 400
    assert other.json()["error_type"] == "not_supported"
    assert "this server has: xgrammar" in other.json()["detail"]


def test_openai_response_format_json_schema_buffered_and_streamed(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    fields: dict[str, Any] = {"model": "primary", "messages": messages, "max_tokens": 120, "temperature": 0}
    result = sdk.chat.completions.create(response_format=response_format, **fields)
    text = result.choices[0].message.content
    assert text is not None
    check_city(text)
    assert result.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(response_format=response_format, stream=True, **fields)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text


def test_openai_json_object_and_the_sdks_parse(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Give me a JSON object with the name and age of a person."}]
    greedy: dict[str, Any] = {"model": "primary", "max_tokens": 200, "temperature": 0}
    result = sdk.chat.completions.create(messages=messages, response_format={"type": "json_object"}, **greedy)
    content = result.choices[0].message.content
    assert content is not None
    assert result.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)
    ask: Any = [{"role": "user", "content": QUESTION}]
    parsed = sdk.chat.completions.parse(messages=ask, response_format=Capital, **greedy)
    capital = parsed.choices[0].message.parsed
    assert isinstance(capital, Capital)
    assert capital.city
