"""The Vertex AI, Snowflake and SageMaker ports over raw HTTP: their envelopes, errors and platform routes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import LiftoffServer, echo_reader, wait_until

AIP = {"AIP_HEALTH_ROUTE": "/health/check", "AIP_PREDICT_ROUTE": "/v1/endpoints/7:predict"}
BATCH = "sf-external-function-query-batch-id"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    readers = {"r1": echo_reader(), "r2": echo_reader("side")}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("platforms"), readers=readers, env=AIP,
                             server={"max_user_batch_size": 5})  # fmt: skip
    instance.start()
    instance.wait_live(2)
    yield instance
    instance.close()


def native_error(response: Any, status: int, error_type: str, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error_type"] == error_type
    for word in words:
        assert word in body["detail"], (word, body)
    return body


# ---- Vertex ---------------------------------------------------------------------------------------------------


def vertex(server: Any, body: Any, path: str = "/generate_vertex") -> Any:
    return server.http.post(server.url("vertex_port") + path, json=body)


def test_vertex_predictions_are_in_instance_order(server: Any) -> None:
    instances = [
        {"text": "first one"},
        {"text": ["a b", "c"], "consumer_group": "side"},
        {"text": "third", "return_metadata": True},
        {"text": "x y z", "max_new_tokens": None},
    ]
    response = vertex(server, {"instances": instances, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert predictions[:2] == [{"text": "first one"}, {"text": ["a b", "c"]}]
    assert predictions[2]["text"] == "third"
    assert predictions[2]["metadata"]["completion_tokens"] == 1
    assert predictions[3] == {"text": "x y"}  # an explicit null in an instance leaves the parameters' value
    assert len(predictions) == 4


def test_vertex_routes_from_aip_variables(server: Any) -> None:
    assert server.http.get(server.url("vertex_port") + AIP["AIP_HEALTH_ROUTE"]).json()["status"] == "ok"
    response = vertex(server, {"instances": [{"text": "via aip"}]}, AIP["AIP_PREDICT_ROUTE"])
    assert response.json() == {"predictions": [{"text": "via aip"}]}


def test_vertex_errors(server: Any) -> None:
    bad = vertex(server, {"instances": [{"text": "ok"}, {"text": 5}]})
    body = native_error(bad, 422, "validation_error", "instances.1: ", "text: Input should be a valid string")
    assert body["errors"][0]["loc"] == "instances.1.text"
    unknown = vertex(server, {"instances": [{"text": "ok"}, {"prompt": "no text"}]})
    native_error(unknown, 400, "invalid_request", "instances.1: prompt is not a field", "takes: text")
    native_error(vertex(server, {"instances": []}), 422, "validation_error", "instances")
    native_error(vertex(server, {"instance": [{"text": "x"}]}), 400, "invalid_request", "instance is not a field")
    missing = vertex(server, {"instances": [{"text": "ok"}, {"text": "x", "consumer_group": "nope"}]})
    native_error(missing, 404, "not_found", "'nope' does not exist")
    too_many = vertex(server, {"instances": [{"text": ["a", "b", "c", "d", "e", "f"]}]})
    native_error(too_many, 400, "invalid_request", "max_user_batch_size")
    spread = vertex(server, {"instances": [{"text": ["a", "b", "c"]}, {"text": ["d", "e", "f"]}]})
    native_error(spread, 400, "invalid_request", "the instances hold 6 prompts", "max_user_batch_size (5)")
    rows = vertex(server, {"instances": [{"text": "x"}] * 6})
    native_error(rows, 400, "invalid_request", "instances has 6 items", "max_user_batch_size (5)")


# ---- Snowflake ------------------------------------------------------------------------------------------------


def snowflake(server: Any, body: Any, batch: str | None = None) -> Any:
    headers = {BATCH: batch} if batch else {}
    return server.http.post(server.url("snowflake_port") + "/generate_snowflake", json=body, headers=headers)


def test_snowflake_rows_come_back_with_their_numbers(server: Any) -> None:
    rows = [[0, {"text": "zero"}], [5, "plain string"], [2, {"text": ["p q", "r"], "max_new_tokens": 1}]]
    response = snowflake(server, {"data": rows})
    assert response.status_code == 200
    assert BATCH not in response.headers
    assert response.json() == {"data": [[0, "zero"], [5, "plain string"], [2, ["p", "r"]]]}


def test_a_failed_row_does_not_fail_the_others(server: Any) -> None:
    rows = [[0, {"text": "fine"}], [1, {"text": 5}], [2, {"text": "x", "consumer_group": "nope"}], [3, "also fine"]]
    response = snowflake(server, {"data": rows})
    assert response.status_code == 200
    data = response.json()["data"]
    assert [row[0] for row in data] == [0, 1, 2, 3]
    assert (data[0][1], data[3][1]) == ("fine", "also fine")
    assert data[1][1]["error_type"] == "validation_error"
    assert "text" in data[1][1]["error"]
    assert data[2][1]["error_type"] == "not_found"
    assert "'nope' does not exist" in data[2][1]["error"]
    assert "primary" not in data[2][1]["error"]  # other groups are not listed to a client


def test_snowflake_batch_id_is_echoed_and_a_resent_batch_is_answered_again(server: Any) -> None:
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("sfcache"))
    reader_id = created.json()["reader_id"]
    wait_until(lambda: reader_id in server.readers(), what="the sfcache reader")
    body = {"data": [[0, {"text": "a b c d", "consumer_group": "sfcache"}]]}
    first = snowflake(server, body, batch="batch-1")
    assert first.headers[BATCH] == "batch-1"
    assert first.json() == {"data": [[0, "a b c d"]]}
    assert server.http.delete(server.mgmt + f"/reader/{reader_id}").status_code == 204
    again = snowflake(server, body, batch="batch-1")  # no reader could generate it now: the kept answer
    assert again.headers[BATCH] == "batch-1"
    assert again.content == first.content
    other = snowflake(server, {"data": [[0, {"text": "new", "consumer_group": "sfcache"}]]}, batch="batch-1")
    assert other.json()["data"][0][1]["error_type"] == "not_found"  # same id, other body: generated anew
    unnamed = snowflake(server, body)
    assert unnamed.json()["data"][0][1]["error_type"] == "not_found"  # no batch id: nothing is kept


def test_snowflake_envelope_errors_fail_the_request(server: Any) -> None:
    native_error(snowflake(server, {"rows": []}), 400, "invalid_request", "rows is not a field", "takes: data")
    native_error(snowflake(server, {}), 422, "validation_error", "data")
    too_many = snowflake(server, {"data": [[number, "x"] for number in range(6)]})
    native_error(too_many, 400, "invalid_request", "data has 6 rows", "max_user_batch_size (5)")
    spread = snowflake(server, {"data": [[0, {"text": ["a", "b", "c"]}], [1, {"text": ["d", "e", "f"]}]]})
    native_error(spread, 400, "invalid_request", "the rows hold 6 prompts", "max_user_batch_size (5)")
    native_error(snowflake(server, {"data": [["zero", "x"]]}), 422, "validation_error", "data.0.0")
    native_error(snowflake(server, {"data": [[0, 7]]}), 422, "validation_error", "data.0.1")


# ---- SageMaker and the native extras ---------------------------------------------------------------------------


def test_sagemaker_invocations_and_ping(server: Any) -> None:
    url = server.url("sagemaker_port")
    response = server.http.post(url + "/invocations", json={"text": ["one", "two"]})
    assert response.json() == {"text": ["one", "two"]}
    native_error(server.http.post(url + "/invocations", json={}), 422, "validation_error", "text")
    ping = server.http.get(url + "/ping")
    assert ping.status_code == 200
    assert ping.json() == {"status": "healthy"}  # nothing more: no pids, paths or configuration


def test_sagemaker_ping_is_503_until_a_reader_is_live(liftoff: Any) -> None:
    instance = liftoff(readers={"r1": echo_reader(load_delay_ms=60_000)}).start(wait="loading")
    ping = instance.http.get(instance.url("sagemaker_port") + "/ping")
    assert ping.status_code == 503
    assert ping.json() == {"status": "unhealthy"}


@pytest.mark.parametrize(
    ("path", "body", "words", "required"),
    [
        ("/embed", {"text": ["a", "b"]}, "embeddings need an EMBEDDING reader", "text"),
        ("/classify", {"text": [["q", "doc"]]}, "need a CLASSIFICATION reader", "text"),
        ("/rerank", {"query": "q", "documents": ["doc"]}, "need a CLASSIFICATION reader", "documents"),
    ],
)
def test_embed_and_classify_say_they_need_other_readers(server: Any, path: str, body: Any, words: str,
                                                        required: str) -> None:  # fmt: skip
    native_error(server.http.post(server.base + path, json=body), 400, "invalid_request", words, "CAUSAL")
    native_error(server.http.post(server.base + path, json={}), 422, "validation_error", required)
    native_error(server.http.post(server.base + path, json={"texts": "x"}), 400, "invalid_request", "texts", required)


def test_every_port_describes_its_api(server: Any) -> None:
    expected = {
        "vertex_port": "/generate_vertex",
        "openai_port": "/v1/chat/completions",
        "snowflake_port": "/generate_snowflake",
        "sagemaker_port": "/invocations",
        "port": "/embed",
    }
    for key in server.ports:
        response = server.http.get(server.url(key) + "/openapi.json")
        assert response.status_code == 200, (key, response.text)
        if key in expected:
            assert expected[key] in response.json()["paths"], key
    vertex_paths = server.http.get(server.url("vertex_port") + "/openapi.json").json()["paths"]
    assert {AIP["AIP_HEALTH_ROUTE"], AIP["AIP_PREDICT_ROUTE"]} <= set(vertex_paths)


def test_the_echo_option_logs_every_generation_surface(liftoff: Any) -> None:
    instance = liftoff(readers={"r1": echo_reader()}, server={"echo": True}).start()
    post = instance.http.post
    assert post(instance.base + "/generate", json={"text": "native"}).status_code == 200
    assert post(instance.url("vertex_port") + "/generate_vertex", json={"instances": [{"text": "vx"}]}).is_success
    assert post(instance.url("snowflake_port") + "/generate_snowflake", json={"data": [[0, "sf"]]}).is_success
    openai_url = instance.url("openai_port") + "/v1/completions"
    assert post(openai_url, json={"model": "primary", "prompt": "oa"}).is_success
    assert post(openai_url, json={"model": "primary", "prompt": "oas", "stream": True}).is_success
    log = wait_until(lambda: "echo /v1/completions request=" in instance.log() and instance.log())
    assert 'echo /generate request={"text":"native"} response=' in log
    assert 'echo /generate_vertex request={"instances":[{"text":"vx"}]} response=' in log
    assert "echo /generate_snowflake request=" in log
    assert "'predictions': [{'text': 'vx'}]" in log
    assert "(streamed)" in log
