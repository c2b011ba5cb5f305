"""Prometheus ``/metrics``, request ids and request log lines, against a real gateway with echo readers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import LiftoffServer, echo_reader, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    readers = {"r1": echo_reader(), "slow": echo_reader("slow", delay_ms=200)}
    instance = LiftoffServer(workdir=tmp_path_factory.mktemp("observe"), readers=readers,
                             server={"heartbeat_interval_ms": 200, "request_timeout_s": 1})  # fmt: skip
    instance.start(timeout=60)
    instance.wait_live(2)
    yield instance
    instance.close()


def scrape(server: Any) -> dict[str, list[Any]]:
    """Every sample of ``/metrics`` by sample name (the exposition must parse)."""
    response = server.http.get(server.mgmt + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_are_counted_under_takeoffs_names(server: Any) -> None:
    server.generate(["one two three", "four five"], max_new_tokens=3)
    with server.http.stream("POST", server.base + "/generate_stream", json={"text": "a b c d"}) as stream:
        assert "".join(stream.iter_text())
    server.http.post(server.base + "/tokenize/r1", json={"text": "a b"})
    samples = scrape(server)
    port = str(server.ports["port"])
    assert value(samples, "http_requests_total", port=port, path="/generate", method="POST", status="200") >= 1
    assert value(samples, "http_requests_total", path="/tokenize/{reader_id}", status="200") >= 1
    assert value(samples, "http_pre_handler_requests_total", path="/generate_stream") >= 1
    assert value(samples, "http_requests_duration_seconds_count", path="/generate") >= 1
    assert value(samples, "generate_tokens", consumer_group="primary") >= 9
    assert value(samples, "liftoff_prompt_tokens", consumer_group="primary") >= 9
    assert value(samples, "time_to_first_token_count", consumer_group="primary") >= 2  # one per user request
    assert value(samples, "liftoff_inter_token_latency_seconds_count", consumer_group="primary") >= 1
    assert value(samples, "queue_time_count", consumer_group="primary") >= 3
    assert value(samples, "user_batch_size_sum", consumer_group="primary") >= 3
    assert value(samples, "liftoff_readers", state="live") == 2
    assert "liftoff_requests_waiting" in samples
    assert "liftoff_requests_running" in samples


def test_reader_figures_arrive_with_heartbeats(server: Any) -> None:
    server.generate("a b c d e f", max_new_tokens=6)

    def reported() -> bool:
        return value(scrape(server), "generate_count", reader="r1") > 0

    wait_until(reported, 10, what="reader r1's totals in /metrics")
    samples = scrape(server)
    assert value(samples, "generate_batch_size_count", reader="r1") >= 1
    assert value(samples, "generate_batch_size_sum", reader="r1") >= 1
    assert value(samples, "liftoff_reader_tokens", reader="r1") >= 6


def test_rejections_and_timeouts_are_counted(server: Any) -> None:
    assert server.generate("x", consumer_group="nowhere").status_code == 404
    slow = server.generate("a b c d e f g h i j", consumer_group="slow", min_new_tokens=50, max_new_tokens=50)
    assert slow.status_code == 504
    samples = scrape(server)
    assert value(samples, "liftoff_rejections_total", consumer_group="unknown", reason="not_found") >= 1
    assert value(samples, "liftoff_rejections_total", consumer_group="nowhere", reason="not_found") == 0
    assert value(samples, "liftoff_timeouts_total", consumer_group="slow") >= 1


def test_request_ids_are_returned_and_accepted(server: Any) -> None:
    chosen = server.http.post(server.base + "/generate", json={"text": "hi"}, headers={"X-Request-Id": "abc-123"})
    assert chosen.headers["x-request-id"] == "abc-123"
    made = server.generate("hi").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", made)
    odd = server.http.post(server.base + "/generate", json={"text": "hi"}, headers={"X-Request-Id": "bad id\t!"})
    assert odd.headers["x-request-id"] != "bad id\t!"
    error = server.http.post(server.base + "/generate", content=b"{", headers={"X-Request-Id": "broken-1"})
    assert error.status_code == 400
    assert error.headers["x-request-id"] == "broken-1"
    assert server.http.get(server.mgmt + "/status").headers["x-request-id"]


def test_one_log_line_per_request_with_its_figures(server: Any) -> None:
    server.http.post(server.base + "/generate", json={"text": "one two three", "max_new_tokens": 2},
                     headers={"X-Request-Id": "log-me-1"})  # fmt: skip

    def line() -> str | None:
        return next((x for x in server.log().splitlines() if "request_id=log-me-1 " in x), None)

    found = wait_until(line, 5, what="the request's log line")
    for part in ("method=POST", "path=/generate", "status=200", "consumer_group=primary", "reader_id=r1",
                 "prompt_tokens=", "completion_tokens=2", "ttft_ms="):  # fmt: skip
        assert part in found, (part, found)


def test_metrics_off_is_404_and_json_logs(liftoff: type[LiftoffServer]) -> None:
    server = liftoff(readers={"r1": echo_reader()}, server={"enable_metrics": False, "log_format": "json"}).start()
    response = server.http.get(server.mgmt + "/metrics")
    assert response.status_code == 404
    assert "enable_metrics is false" in response.json()["detail"]
    server.http.post(server.base + "/generate", json={"text": "hi"}, headers={"X-Request-Id": "json-1"})

    def record() -> dict[str, Any] | None:
        for line in server.log().splitlines():
            if line.startswith("{") and '"json-1"' in line:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        return None

    found = wait_until(record, 5, what="the JSON request line")
    assert found["request_id"] == "json-1"
    assert found["status"] == 200
    assert found["consumer_group"] == "primary"
    assert found["logger"] == "liftoff.requests"


def test_liftoff_status_prints_the_readers_table(server: Any) -> None:
    result = subprocess.run([sys.executable, "-m", "liftoff", "status", "--url", server.mgmt],
                            capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["READER", "STATE", "GROUPS"]
    assert {line.split()[0] for line in lines[1:]} == {"r1", "slow"}
    assert all(" live " in line for line in lines[1:])
    down = subprocess.run([sys.executable, "-m", "liftoff", "status", "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert down.returncode == 1
    assert "cannot reach" in down.stderr
