"""The platform surfaces in process: Vertex AI (port 3002, ``liftoff.gateway.surfaces.vertex``), Snowflake (3004,
``.snowflake``) and SageMaker (8080, ``.sagemaker``), as docs/api.md specifies them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from liftoff.core.errors import BackendError
from liftoff.protocol.snowflake import SnowflakeResponse
from liftoff.protocol.vertex import VertexResponse
from tests.unit.conftest import GatewayFactory
from tests.unit.fake_reader import HOLD, Behaviour, embedding
from tests.unit.inprocess import InProcessGateway
from tests.unit.test_surface_native import check_error, until


async def call(gateway: InProcessGateway, port_key: str, path: str, body: Any, **kwargs: Any) -> Any:
    async with gateway.client(port_key) as http:
        return await http.post(path, json=body, **kwargs)


BATCH_HEADER = "sf-external-function-query-batch-id"  # Snowflake names each batch in it


def meta(prompt: int, completion: int, reason: str = "stop") -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "finish_reason": reason, "reader_id": "reader-a"}


# ---- Vertex -----------------------------------------------------------------------------------------------------


async def vertex(gateway: InProcessGateway, body: Any, path: str = "/generate_vertex") -> Any:
    return await call(gateway, "vertex_port", path, body)


async def test_vertex_predictions_in_instance_order_over_the_parameters(gateway: InProcessGateway) -> None:
    body = {
        "instances": [{"text": "a b"}, {"text": "c d e", "max_new_tokens": 1}, {"text": "f", "max_new_tokens": None}],
        "parameters": {"max_new_tokens": 5, "return_metadata": True},
    }
    response = await vertex(gateway, body)
    assert response.status_code == 200
    assert response.json() == {
        "predictions": [
            {"text": "a b", "metadata": meta(2, 2)},
            {"text": "c", "metadata": meta(3, 1, "length")},
            {"text": "f", "metadata": meta(1, 1)},
        ]
    }
    VertexResponse.model_validate(response.json())
    assert [frame.params.max_new_tokens for frame in gateway.broker.submitted] == [5, 1, 5]  # null keeps the default


async def test_vertex_an_instance_with_a_batch(gateway: InProcessGateway) -> None:
    response = await vertex(gateway, {"instances": [{"text": ["x", "y z"]}]})
    assert response.json() == {"predictions": [{"text": ["x", "y z"]}]}


async def test_vertex_invalid_instances_are_named(gateway: InProcessGateway) -> None:
    unknown = check_error(
        await vertex(gateway, {"instances": [{"text": "a"}, {"text": "b", "colour": 1}]}), 400, "invalid_request"
    )
    assert unknown["detail"].startswith("instances.1:")
    wrong = check_error(await vertex(gateway, {"instances": [{"text": 5}]}), 422, "validation_error")
    assert wrong["errors"][0]["loc"] == "instances.0.text"
    check_error(await vertex(gateway, {"instances": []}), 422, "validation_error")
    check_error(await vertex(gateway, {"instances": [{"text": "a"}], "extra": 1}), 400, "invalid_request")
    assert gateway.broker.submitted == []


async def test_vertex_limits(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_user_batch_size=2)
    gateway.broker.connect("reader-a")
    many = {"instances": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}
    assert "max_user_batch_size" in check_error(await vertex(gateway, many), 400, "invalid_request")["detail"]
    prompts = {"instances": [{"text": ["a", "b"]}, {"text": "c"}]}
    assert "3 prompts" in check_error(await vertex(gateway, prompts), 400, "invalid_request")["detail"]


async def test_vertex_one_failing_instance_fails_the_request_and_aborts_the_others(gateway: InProcessGateway) -> None:
    gateway.broker.readers["reader-a"].behaviour = Behaviour(fail=BackendError("bad instance"))
    gateway.broker.connect("slow", ("side",)).behaviour = HOLD
    body = {"instances": [{"text": "fails"}, {"text": "waits", "consumer_group": "side"}]}
    assert check_error(await vertex(gateway, body), 500, "generation_error")["detail"] == "bad instance"
    waiting = next(frame for frame in gateway.broker.submitted if frame.consumer_group == "side")
    assert waiting.request_id in gateway.broker.aborted
    assert gateway.broker.in_flight() == 0


async def test_vertex_embeddings_for_an_embedding_group(gateway: InProcessGateway) -> None:
    gateway.broker.connect("embedder", ("embed",), model_type="EMBEDDING")
    body = {"instances": [{"content": "one two"}, {"text": "three"}], "parameters": {"consumer_group": "embed"}}
    answer = (await vertex(gateway, body)).json()
    assert answer == {
        "predictions": [
            {"embeddings": {"values": embedding("one two", 0), "statistics": {"token_count": 2, "truncated": False}}},
            {"embeddings": {"values": embedding("three", 1), "statistics": {"token_count": 1, "truncated": False}}},
        ]
    }
    missing = check_error(
        await vertex(gateway, {"instances": [{"content": 3}], "parameters": {"consumer_group": "embed"}}),
        422,
        "validation_error",
    )
    assert missing["errors"][0]["loc"] == "instances.0.content"


async def test_vertex_aip_routes(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(
        vertex_health_route="/v1/endpoints/e/health", vertex_predict_route="/v1/endpoints/e:predict"
    )
    async with gateway.client("vertex_port") as http:
        assert (await http.get("/v1/endpoints/e/health")).status_code == 503  # no reader yet
        gateway.broker.connect("reader-a")
        health = await http.get("/v1/endpoints/e/health")
        predicted = await http.post("/v1/endpoints/e:predict", json={"instances": [{"text": "hi"}]})
    assert health.status_code == 200
    assert health.json()["live_readers"] == 1
    assert predicted.json() == {"predictions": [{"text": "hi"}]}


# ---- Snowflake --------------------------------------------------------------------------------------------------


async def snowflake(gateway: InProcessGateway, body: Any, batch_id: str | None = None) -> Any:
    headers = {BATCH_HEADER: batch_id} if batch_id else {}
    return await call(gateway, "snowflake_port", "/generate_snowflake", body, headers=headers)


async def test_snowflake_rows_keep_their_numbers(gateway: InProcessGateway) -> None:
    rows = [
        [0, "a b"],
        [7, {"text": "c d", "max_new_tokens": 1}],
        [2, {"text": "x", "return_metadata": True}],
        [3, {"text": ["p", "q r"]}],
    ]
    response = await snowflake(gateway, {"data": rows})
    assert response.status_code == 200
    assert response.json() == {
        "data": [[0, "a b"], [7, "c"], [2, {"text": "x", "metadata": meta(1, 1)}], [3, ["p", "q r"]]]
    }
    assert BATCH_HEADER not in response.headers
    SnowflakeResponse.model_validate(response.json())


async def test_snowflake_a_failing_row_does_not_fail_the_batch(gateway: InProcessGateway) -> None:
    gateway.broker.connect("broken", ("side",)).behaviour = Behaviour(fail=BackendError("row broke"))
    rows = [
        [0, {"text": "x", "colour": 1}],
        [1, {"text": "y", "consumer_group": "nope"}],
        [2, {"text": "z", "consumer_group": "side"}],
        [3, "fine"],
    ]
    data = (await snowflake(gateway, {"data": rows})).json()["data"]
    assert [number for number, _ in data] == [0, 1, 2, 3]
    assert data[0][1]["error_type"] == "invalid_request"
    assert "colour" in data[0][1]["error"]
    assert data[1][1]["error_type"] == "not_found"
    assert data[2][1] == {"error": "row broke", "error_type": "generation_error"}
    assert data[3][1] == "fine"


async def test_snowflake_a_resent_batch_is_answered_again_without_generating(gateway: InProcessGateway) -> None:
    batch_id = f"batch-{uuid.uuid4()}"
    body = {"data": [[0, "once only"]]}
    first = await snowflake(gateway, body, batch_id)
    again = await snowflake(gateway, body, batch_id)
    assert first.headers[BATCH_HEADER] == again.headers[BATCH_HEADER] == batch_id
    assert first.json() == again.json() == {"data": [[0, "once only"]]}
    assert len(gateway.broker.submitted) == 1
    other = await snowflake(gateway, {"data": [[0, "another body"]]}, batch_id)
    assert other.json() == {"data": [[0, "another body"]]}
    assert len(gateway.broker.submitted) == 2


async def test_snowflake_envelope_errors(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(max_user_batch_size=2)
    gateway.broker.connect("reader-a")
    check_error(await snowflake(gateway, {"rows": []}), 400, "invalid_request")
    check_error(await snowflake(gateway, {"data": [["zero", "a"]]}), 422, "validation_error")
    check_error(await snowflake(gateway, {"data": [[0, "a"], [1, "b"], [2, "c"]]}), 400, "invalid_request")
    check_error(await snowflake(gateway, {"data": [[0, {"text": ["a", "b"]}], [1, "c"]]}), 400, "invalid_request")
    assert gateway.broker.submitted == []


# ---- SageMaker --------------------------------------------------------------------------------------------------


async def test_sagemaker_invocations_is_generate(gateway: InProcessGateway) -> None:
    response = await call(gateway, "sagemaker_port", "/invocations", {"text": "a b c", "return_metadata": True})
    assert response.json() == {"text": "a b c", "metadata": meta(3, 3)}
    unknown = await call(gateway, "sagemaker_port", "/invocations", {"text": "a", "consumer_group": "nope"})
    check_error(unknown, 404, "not_found")


async def test_sagemaker_ping_follows_the_readers(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(api_keys="secret-key-0123456789")
    async with gateway.client("sagemaker_port") as http:  # no key: SageMaker's health checks send none
        before = await http.get("/ping")
        gateway.broker.connect("reader-a")
        after = await http.get("/ping")
        gateway.broker.disconnect("reader-a")
        lost = await http.get("/ping")
    assert (before.status_code, before.json()) == (503, {"status": "unhealthy"})
    assert (after.status_code, after.json()) == (200, {"status": "healthy"})
    assert lost.status_code == 503


async def test_sagemaker_invocations_wait_for_a_reserved_groups_first_reader(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory()  # primary is reserved: its requests wait for a reader
    task = asyncio.create_task(call(gateway, "sagemaker_port", "/invocations", {"text": "patience"}))
    await until(lambda: gateway.broker.queue_depth("primary") == 1)
    gateway.broker.connect("reader-a")
    assert (await task).json() == {"text": "patience"}
