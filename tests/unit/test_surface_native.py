"""The native inference surface (port 3000, ``liftoff.gateway.surfaces.native``) in process: ``/generate``,
``/generate_stream`` (SSE framing), the masked ``/status``, and their errors, as docs/api.md specifies them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from liftoff.core.clock import monotonic
from liftoff.core.errors import BackendError
from liftoff.protocol.native import GenerateRequest, GenerateResponse
from tests.unit.conftest import GatewayFactory
from tests.unit.fake_reader import HOLD, Behaviour
from tests.unit.inprocess import InProcessGateway, sse_data

PROMPT = "The quick brown fox"


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Let the event loop run until ``predicate()`` holds; fail after ``within_s`` seconds."""
    deadline = monotonic() + within_s
    while not predicate():
        if monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await asyncio.sleep(0.001)


async def post(gateway: InProcessGateway, path: str, body: Any) -> Any:
    async with gateway.client() as http:
        return await http.post(path, json=body)


def check_error(response: Any, status: int, error_type: str, *, param_in: str | None = None) -> dict[str, Any]:
    """A native error body: ``{"detail", "error_type"}`` (plus ``errors`` for invalid fields)."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error_type"] == error_type
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if param_in is not None:
        assert param_in in body["detail"] or any(param_in in str(error["loc"]) for error in body.get("errors", []))
    return body


# ---- /generate --------------------------------------------------------------------------------------------------


async def test_generate_answers_the_readers_text(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/generate", {"text": PROMPT})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"text": PROMPT}
    GenerateResponse.model_validate(response.json())
    [frame] = gateway.broker.submitted
    assert (frame.consumer_group, frame.text, frame.params.max_new_tokens) == ("primary", PROMPT, 128)


async def test_generate_with_metadata(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/generate", {"text": PROMPT, "return_metadata": True, "max_new_tokens": 2})
    assert response.json() == {
        "text": "The quick",
        "metadata": {"prompt_tokens": 4, "completion_tokens": 2, "finish_reason": "length", "reader_id": "reader-a"},
    }


async def test_generate_a_batch_answers_in_input_order(gateway: InProcessGateway) -> None:
    prompts = ["one two three", "uno", "eins zwei"]
    response = await post(gateway, "/generate", {"text": prompts, "return_metadata": True})
    body = response.json()
    assert body["text"] == prompts
    assert [meta["completion_tokens"] for meta in body["metadata"]] == [3, 1, 2]
    assert {frame.text for frame in gateway.broker.submitted} == set(prompts)  # one broker request per prompt


async def test_requests_of_a_group_spread_over_its_live_readers(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].capacity = 1
    gateway.broker.connect("reader-b", capacity=1)
    body = {"text": "hi", "return_metadata": True}
    answers = await asyncio.gather(*(post(gateway, "/generate", body) for _ in range(2)))
    assert sorted(answer.json()["metadata"]["reader_id"] for answer in answers) == ["reader-a", "reader-b"]


async def test_sampling_fields_reach_the_reader(gateway: InProcessGateway) -> None:
    body = {
        "text": "hi",
        "sampling_temperature": 0.5,
        "sampling_topk": 7,
        "sampling_topp": 0.9,
        "min_new_tokens": 1,
        "use_chat_template": True,
        "consumer_group": None,
    }
    assert (await post(gateway, "/generate", body)).status_code == 200
    params = gateway.broker.submitted[0].params
    assert (params.temperature, params.top_k, params.top_p, params.min_new_tokens) == (0.5, 7, 0.9, 1)
    assert params.use_chat_template is True


# ---- /generate_stream -------------------------------------------------------------------------------------------


async def test_stream_sends_one_event_per_token(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/generate_stream", {"text": PROMPT})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    events = sse_data(response.text)
    assert events == [("message", "The"), ("message", " quick"), ("message", " brown"), ("message", " fox")]
    assert response.text.startswith("data: The\n\ndata:  quick\n\n")  # the leading space survives the framing
    assert "[DONE]" not in response.text


async def test_stream_tokens_with_line_breaks_are_one_data_line_per_line(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/generate_stream", {"text": "first\nsecond\r\nthird"})
    assert "data: first\n\ndata: \ndata: second\n\n" in response.text
    assert [data for _, data in sse_data(response.text)] == ["first", "\nsecond", "\nthird"]


async def test_stream_of_a_batch_tags_each_event_with_its_prompt(gateway: InProcessGateway) -> None:
    prompts = ["a b c", "x y"]
    response = await post(gateway, "/generate_stream", {"text": prompts, "return_metadata": True})
    events = sse_data(response.text)
    texts = ["", ""]
    metadata = {}
    for event, data in events:
        payload = json.loads(data)
        if event == "metadata":
            metadata[payload["batch_id"]] = payload
        else:
            assert event == "message"
            assert set(payload) == {"text", "batch_id"}
            texts[payload["batch_id"]] += payload["text"]
    assert texts == prompts
    assert metadata[0] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "finish_reason": "stop",
        "reader_id": "reader-a",
        "batch_id": 0,
    }
    assert metadata[1]["completion_tokens"] == 2


async def test_stream_metadata_of_one_prompt_has_no_batch_id(gateway: InProcessGateway) -> None:
    response = await post(gateway, "/generate_stream", {"text": "a b", "return_metadata": True})
    events = sse_data(response.text)
    assert events[:2] == [("message", "a"), ("message", " b")]
    assert events[2][0] == "metadata"
    assert json.loads(events[2][1]) == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "finish_reason": "stop",
        "reader_id": "reader-a",
    }


async def test_stream_error_before_any_token_is_a_plain_http_error(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("the model broke"))
    response = await post(gateway, "/generate_stream", {"text": PROMPT})
    assert response.headers["content-type"] == "application/json"
    assert check_error(response, 500, "generation_error")["detail"] == "the model broke"


async def test_stream_error_after_tokens_is_the_last_event(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("the model broke"), fail_after=2)
    response = await post(gateway, "/generate_stream", {"text": PROMPT})
    assert response.status_code == 200
    events = sse_data(response.text)
    assert events[:2] == [("message", "The"), ("message", " quick")]
    assert events[2:] == [
        ("error", json.dumps({"detail": "the model broke", "error_type": "generation_error"}, separators=(",", ":")))
    ]


async def test_stream_error_of_a_batch_is_the_last_event_of_its_prompt(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("broke"), fail_after=1)
    response = await post(gateway, "/generate_stream", {"text": ["a b", "c d"]})
    by_prompt: dict[int, list[tuple[str, dict[str, Any]]]] = {0: [], 1: []}
    for event, data in sse_data(response.text):
        payload = json.loads(data)
        by_prompt[payload["batch_id"]].append((event, payload))
    assert by_prompt[0] == [
        ("message", {"text": "a", "batch_id": 0}),
        ("error", {"detail": "broke", "error_type": "generation_error", "batch_id": 0}),
    ]
    assert by_prompt[1] == [
        ("message", {"text": "c", "batch_id": 1}),
        ("error", {"detail": "broke", "error_type": "generation_error", "batch_id": 1}),
    ]


# ---- errors -----------------------------------------------------------------------------------------------------


async def test_generate_error_is_the_answer(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("no luck"), fail_after=1)
    assert (
        check_error(await post(gateway, "/generate", {"text": PROMPT}), 500, "generation_error")["detail"] == "no luck"
    )


@pytest.mark.parametrize(
    ("body", "status", "error_type", "param"),
    [
        ({"text": "hi", "colour": "red"}, 400, "invalid_request", "colour"),
        ({"text": "hi", "max_new_tokens": 0}, 400, "invalid_request", "max_new_tokens"),
        ({"text": "hi", "sampling_topp": 1.5}, 400, "invalid_request", "sampling_topp"),
        ({"text": []}, 400, "invalid_request", "text"),
        ({"text": "hi", "min_new_tokens": 9, "max_new_tokens": 3}, 400, "invalid_request", "min_new_tokens"),
        ({"text": "hi", "image_paths": ["/tmp/cat.png"]}, 400, "not_supported", "image_paths"),
        ({"text": "hi", "consumer_group": "nobody"}, 404, "not_found", "nobody"),
        ({"max_new_tokens": 3}, 422, "validation_error", "text"),
        ({"text": 42}, 422, "validation_error", "text"),
    ],
)
async def test_bad_generate_bodies(
    gateway: InProcessGateway, body: dict[str, Any], status: int, error_type: str, param: str
) -> None:
    for path in ("/generate", "/generate_stream"):
        check_error(await post(gateway, path, body), status, error_type, param_in=param)
    assert gateway.broker.submitted == []  # refused before anything was queued


async def test_malformed_json_is_a_400(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.post("/generate", content=b'{"text": "hi"', headers={"content-type": "application/json"})
    check_error(response, 400, "invalid_request")


async def test_prompt_limits(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_prompt_string_bytes=8, max_user_batch_size=2)
    gateway.broker.connect("reader-a")
    check_error(await post(gateway, "/generate", {"text": "nine byte"}), 400, "invalid_request")
    check_error(await post(gateway, "/generate", {"text": ["a", "b", "c"]}), 400, "invalid_request")
    assert (await post(gateway, "/generate", {"text": ["a", "b"]})).json() == {"text": ["a", "b"]}


async def test_a_group_with_no_live_reader_is_503(gateway: InProcessGateway) -> None:
    gateway.broker.connect("reader-b", ("side",), loaded=False)
    body = check_error(await post(gateway, "/generate", {"text": "hi", "consumer_group": "side"}), 503, "unavailable")
    assert "side" in body["detail"]


async def test_generation_sent_to_an_embedding_group_is_a_400(gateway: InProcessGateway) -> None:
    gateway.broker.connect("embedder", ("embed",), model_type="EMBEDDING")
    body = check_error(
        await post(gateway, "/generate", {"text": "hi", "consumer_group": "embed"}), 400, "invalid_request"
    )
    assert "CAUSAL" in body["detail"]
    assert "EMBEDDING" in body["detail"]


async def test_full_queues_are_429_with_retry_after(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_queued_requests=1)
    reader = gateway.broker.connect("slow", ("side",), capacity=1)
    reader.behaviour = HOLD
    first = asyncio.create_task(post(gateway, "/generate", {"text": "runs", "consumer_group": "side"}))
    second = asyncio.create_task(post(gateway, "/generate", {"text": "waits", "consumer_group": "side"}))
    await until(lambda: gateway.broker.queue_depth("side") == 1 and gateway.broker.in_flight("side") == 1)
    response = await post(gateway, "/generate", {"text": "refused", "consumer_group": "side"})
    check_error(response, 429, "overloaded")
    assert response.headers["retry-after"] == "1"
    gateway.broker.disconnect("slow")  # the held requests had not started: with no reader left they fail
    for task in (first, second):
        check_error(await task, 503, "unavailable")


async def test_the_deadline_is_a_504_and_aborts_the_request(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(request_timeout_s=0.2)
    gateway.broker.connect("slow", capacity=2).behaviour = HOLD
    check_error(await post(gateway, "/generate", {"text": ["a", "b"]}), 504, "timeout")
    assert sorted(gateway.broker.aborted) == sorted(frame.request_id for frame in gateway.broker.submitted)
    assert gateway.broker.in_flight() == 0


async def test_a_request_a_lost_reader_had_not_started_goes_to_another(gateway: InProcessGateway) -> None:
    gateway.broker.connect("doomed", ("side",)).behaviour = HOLD
    task = asyncio.create_task(
        post(gateway, "/generate", {"text": "retried", "consumer_group": "side", "return_metadata": True})
    )
    await until(lambda: gateway.broker.in_flight("side") == 1)
    gateway.broker.connect("backup", ("side",))
    gateway.broker.disconnect("doomed")
    body = (await task).json()
    assert (body["text"], body["metadata"]["reader_id"]) == ("retried", "backup")


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
async def test_a_reader_lost_mid_request_is_reader_died(gateway: InProcessGateway, path: str) -> None:
    gateway.broker.connect("doomed", ("side",)).behaviour = Behaviour(stall_after=1)
    task = asyncio.create_task(post(gateway, path, {"text": "one two", "consumer_group": "side"}))
    await until(lambda: bool(gateway.broker.readers["doomed"].started))
    gateway.broker.disconnect("doomed")
    response = await task
    if path == "/generate":
        check_error(response, 503, "reader_died")
    else:
        events = sse_data(response.text)
        assert events[0] == ("message", "one")
        assert events[1][0] == "error"
        assert json.loads(events[1][1])["error_type"] == "reader_died"


# ---- the masked /status -----------------------------------------------------------------------------------------


async def test_masked_status_shows_readers_without_pids(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        response = await http.get("/status")
    assert response.status_code == 200
    body = response.json()
    assert body["live_readers"] == {
        "reader-a": {"consumer_groups": ["primary"], "device": "cpu", "model_name": "echo", "model_type": "CAUSAL"}
    }
    assert body["dead_readers"] == {}
    assert body["ports"] == gateway.state.ports()
    assert body["ports"][:2] == [3000, 3001]


async def test_masked_status_is_503_until_a_reader_is_live(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory()
    gateway.broker.connect("loading", loaded=False)
    async with gateway.client() as http:
        response = await http.get("/status")
    assert response.status_code == 503
    assert response.json()["live_readers"] == {}


async def test_the_openapi_document_describes_the_generate_body(gateway: InProcessGateway) -> None:
    async with gateway.client() as http:
        document = (await http.get("/openapi.json")).json()
    for path in ("/generate", "/generate_stream"):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["text"]
        assert set(schema["properties"]) == set(GenerateRequest.model_fields)
    assert "text/event-stream" in document["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
