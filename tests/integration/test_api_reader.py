"""API readers (``device: api``) in front of a second, real Liftoff: every surface, clients, failures and health.

The upstream is a real ``liftoff serve`` on loopback (echo readers: exact texts to compare); the front Liftoff's
API reader talks to its OpenAI port like to any OpenAI-compatible server (the ``liftoff`` dialect).
tests/models/test_api_reader.py does the same against llama.cpp's ``llama-server`` serving SmolLM2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from takeoff_client import TakeoffClient

from tests.helpers import LiftoffServer, echo_reader, sse_events, wait_until

PROMPT = "the quick brown fox"


def api_reader(upstream: LiftoffServer, group: str = "primary", model: str = "primary", **fields: Any) -> Any:
    """An API reader's config: ``model`` is the upstream's consumer group (its OpenAI ``model``)."""
    return {"model_name": model, "device": "api", "api_base": upstream.url("openai_port") + "/v1",
            "consumer_group": group, "max_concurrency": 8, **fields}  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiftoffServer, LiftoffServer]]:
    """An upstream Liftoff (echo readers, one that fails to load) and a front Liftoff whose readers are API readers."""
    root = tmp_path_factory.mktemp("api-pair")
    upstream = LiftoffServer(workdir=root / "upstream", readers={
        "e1": echo_reader(delay_ms=2), "slow": echo_reader("slow", delay_ms=400),
        "drip": echo_reader("drip", delay_ms=50),
        "broken": echo_reader("broken", fail_load="no such weights"),
    }, server={"reserved_consumers": ""})  # fmt: skip
    front = None
    try:
        upstream.start()
        wait_until(lambda: "broken" in upstream.readers("dead"), what="the broken upstream reader")
        front = LiftoffServer(workdir=root / "front", readers={
            "api": api_reader(upstream),
            "api-slow": api_reader(upstream, "slow", "slow", api_timeout_s=0.3),
            "api-drip": api_reader(upstream, "drip", "drip"),
            "api-broken": api_reader(upstream, "broken", "broken", api_timeout_s=1),
            "api-missing": api_reader(upstream, "missing", "no-such-group"),
        }, server={"reserved_consumers": ""})  # fmt: skip
        front.start()
        front.wait_live(5)
        yield upstream, front
    finally:
        if front is not None:
            front.close()
        upstream.close()


def upstream_chat(upstream: LiftoffServer, text: str) -> str:
    body = {"model": "primary", "messages": [{"role": "user", "content": text}]}
    response = upstream.http.post(upstream.url("openai_port") + "/v1/chat/completions", json=body)
    return str(response.json()["choices"][0]["message"]["content"])


# ---- every surface ------------------------------------------------------------------------------------------


def test_native_generation_and_stream(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    _, front = pair
    assert front.generate(PROMPT).json() == {"text": PROMPT}
    assert front.generate(["one two", "three"], max_new_tokens=1).json() == {"text": ["one", "three"]}
    with front.http.stream("POST", front.base + "/generate_stream", json={"text": PROMPT}) as response:
        pieces = [data for _, data in sse_events(response.iter_lines())]
    assert "".join(pieces) == PROMPT
    meta = front.generate(PROMPT, return_metadata=True).json()["metadata"]
    assert meta["reader_id"] == "api"
    assert meta["completion_tokens"] == 4


def test_openai_chat_and_completions(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    upstream, front = pair
    client = openai.OpenAI(base_url=front.url("openai_port") + "/v1", api_key="anything", max_retries=0)
    chat = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == upstream_chat(upstream, PROMPT)
    assert chat.usage is not None
    stream = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": PROMPT}],
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == upstream_chat(upstream, PROMPT)
    assert chunks[-1].usage is not None
    completion = client.completions.create(model="primary", prompt=PROMPT, max_tokens=2)
    assert completion.choices[0].text == "the quick"
    assert completion.choices[0].finish_reason == "length"
    client.close()


def test_vertex_snowflake_and_sagemaker(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    _, front = pair
    vertex = front.http.post(front.url("vertex_port") + "/generate_vertex", json={"instances": [{"text": PROMPT}]})
    assert vertex.json() == {"predictions": [{"text": PROMPT}]}
    snowflake = front.http.post(front.url("snowflake_port") + "/generate_snowflake", json={"data": [[3, PROMPT]]})
    assert snowflake.json() == {"data": [[3, PROMPT]]}
    sagemaker = front.http.post(front.url("sagemaker_port") + "/invocations", json={"text": PROMPT})
    assert sagemaker.json() == {"text": PROMPT}


def test_official_clients(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    _, front = pair
    client = TakeoffClient(base_url="http://127.0.0.1", port=front.ports["port"],
                           mgmt_port=front.ports["management_port"])  # fmt: skip
    assert client.generate(PROMPT)["text"] == PROMPT
    assert "".join(event.data for event in client.generate_stream(PROMPT)) == PROMPT
    assert client.get_status()["status"]["live_readers"]["api"]["model_type"] == "API"


@pytest.mark.filterwarnings("ignore:`langchain-community` is being sunset:DeprecationWarning")
def test_langchain(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    from langchain_community.llms import TitanTakeoff

    _, front = pair
    llm = TitanTakeoff(base_url="http://127.0.0.1", port=front.ports["port"],
                       mgmt_port=front.ports["management_port"])  # fmt: skip
    assert llm.invoke(PROMPT) == PROMPT
    assert llm.invoke(PROMPT, stop=[" brown"]) == "the quick"
    assert "".join(llm.stream(PROMPT)) == PROMPT


# ---- refusals and upstream errors ---------------------------------------------------------------------------


def test_fields_the_upstream_lacks_are_refused(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    _, front = pair
    refused = front.generate(PROMPT, no_repeat_ngram_size=2)
    assert refused.status_code == 400
    assert "no_repeat_ngram_size" in refused.json()["detail"]
    regex = front.generate(PROMPT, regex_string="[a-z]+")
    assert regex.status_code == 400
    assert "regex_string is not supported by this API reader's upstream" in regex.json()["detail"]


def test_upstream_client_errors_keep_their_status_and_message(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    upstream, front = pair
    missing = front.generate(PROMPT, consumer_group="missing")
    assert missing.status_code == 404
    assert "'no-such-group' does not exist" in missing.json()["detail"]
    assert upstream.url("openai_port") in missing.json()["detail"]
    schema = front.generate(PROMPT, json_schema={"type": "object"}, use_chat_template=True)
    assert schema.status_code == 400  # the upstream's echo reader cannot follow a schema: its 400, its message
    assert "cannot follow regex_string or json_schema" in schema.json()["detail"]


def test_upstream_503s_are_retried_then_a_503_naming_the_upstream(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    upstream, front = pair
    before = _upstream_503s(upstream)
    response = front.generate(PROMPT, consumer_group="broken")
    assert response.status_code == 503
    detail = response.json()
    assert detail["error_type"] == "upstream_unavailable"
    assert f"{upstream.url('openai_port')}/v1 answered 503" in detail["detail"]
    assert _upstream_503s(upstream) - before >= 2  # tried more than once within api_timeout_s


def _upstream_503s(upstream: LiftoffServer) -> float:
    total = 0.0
    for line in upstream.http.get(upstream.mgmt + "/metrics").text.splitlines():
        if line.startswith("http_requests_total{") and 'path="/v1/completions"' in line and 'status="503"' in line:
            total += float(line.split()[-1])
    return total


def test_a_silent_upstream_is_a_504(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    _, front = pair
    response = front.generate(PROMPT, consumer_group="slow")  # the first token takes 400 ms; api_timeout_s 0.3
    assert response.status_code == 504
    assert response.json()["error_type"] == "upstream_timeout"


def test_a_client_disconnect_cancels_the_upstream_request(pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    upstream, front = pair
    text = " ".join(["word"] * 400)
    body = {"text": text, "consumer_group": "drip", "max_new_tokens": 400}  # 20 s of tokens
    with httpx.Client(timeout=30) as client, client.stream("POST", front.base + "/generate_stream", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data:")
        try:
            wait_until(lambda: _active(upstream, "drip") > 0, what="the upstream to be generating")
        except AssertionError as exc:  # say why (seen on a loaded machine)
            rest = "\n".join(line for _, line in zip(range(20), lines, strict=False))
            upstream_log = "\n".join(line for line in upstream.log().splitlines() if "drip" in line)
            raise AssertionError(f"{exc}\nstream: {first}\n{rest}\nupstream: {upstream_log[-3000:]}") from None
    wait_until(lambda: _active(upstream, "drip") == 0, timeout=10, what="the upstream request to be cancelled")


def _active(server: LiftoffServer, reader_id: str) -> int:
    return int(server.http.get(f"{server.mgmt}/reader/{reader_id}").json()["active_requests"])


# ---- keys and health ------------------------------------------------------------------------------------------


def test_keys_are_masked_and_never_logged(liftoff: Any, pair: tuple[LiftoffServer, LiftoffServer]) -> None:
    upstream, _ = pair
    reader = api_reader(upstream, access_token="sk-test-SECRET-1", api_headers={"x-extra": "HEADER-SECRET-2"})
    server = liftoff(readers={"k": reader}).start()
    assert server.generate(PROMPT).json() == {"text": PROMPT}
    assert server.generate(PROMPT, consumer_group="nope").status_code == 404
    config = server.http.get(server.mgmt + "/reader/k").json()["config"]
    assert config["access_token"] == "***"
    assert config["api_headers"] == {"x-extra": "***"}
    assert "SECRET" not in json.dumps(server.status())
    server.stop()
    assert "SECRET" not in server.log()


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_the_reader_is_dead_while_its_upstream_is_down_and_live_again_after(
    liftoff: Any, request: pytest.FixtureRequest, broker: str
) -> None:
    upstream = liftoff(readers={"e": echo_reader()})
    upstream.start()
    settings: dict[str, Any] = {"reserved_consumers": ""}
    if broker == "redis":  # readers pull from Redis: an unhealthy one must stop pulling by itself
        settings["broker"] = request.getfixturevalue("redis_server").url
    front = liftoff(readers={"api": api_reader(upstream, api_timeout_s=2)}, server=settings)
    front.start()
    upstream.stop()
    record = wait_until(lambda: front.readers("dead").get("api") and _detail(front), timeout=15,
                        what="the API reader to go dead")  # fmt: skip
    assert record["error"].startswith("unhealthy: ")
    refused = front.generate(PROMPT)
    assert refused.status_code == 503  # no live reader in the group: refused at once, not queued
    upstream.start()
    wait_until(lambda: "api" in front.readers("live"), timeout=20, what="the API reader to come back")
    assert front.generate(PROMPT).json() == {"text": PROMPT}


def _detail(server: LiftoffServer) -> dict[str, Any]:
    detail: dict[str, Any] = server.http.get(server.mgmt + "/reader/api").json()
    return detail


def test_post_reader_starts_api_readers_only_for_allowed_upstreams(liftoff: Any) -> None:
    upstream = liftoff(readers={"e": echo_reader()})
    upstream.start()
    allowed = upstream.url("openai_port") + "/v1"
    front = liftoff(readers={}, server={"reserved_consumers": "", "allowed_api_bases": [allowed]})
    front.start(wait=None)
    elsewhere = {**api_reader(upstream), "api_base": "http://127.0.0.1:9/v1"}
    refused = front.http.post(front.mgmt + "/reader", json=elsewhere)
    assert refused.status_code == 400
    assert "allowed_api_bases" in refused.text
    with_file = {**api_reader(upstream), "access_token_file": "/etc/hostname"}
    assert front.http.post(front.mgmt + "/reader", json=with_file).status_code == 400
    created = front.http.post(front.mgmt + "/reader", json=api_reader(upstream))
    assert created.status_code == 201, created.text
    reader_id = created.json()["reader_id"]
    wait_until(lambda: reader_id in front.readers("live"), what="the created API reader to be live")
    assert front.generate(PROMPT).json() == {"text": PROMPT}
