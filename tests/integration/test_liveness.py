"""Dead and silent readers, retries of unstarted work, buffering in reserved groups, disconnect cancellation."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import httpx

from tests.helpers import echo_reader, process_alive, sse_events, wait_until

TOKENS = 20
LONG = {"min_new_tokens": TOKENS, "max_new_tokens": TOKENS, "return_metadata": True}


def _stream(server: Any, started: threading.Semaphore, **fields: Any) -> dict[str, Any]:
    """Run one streaming request; return its tokens, metadata and error events."""
    out: dict[str, Any] = {"tokens": [], "metadata": None, "error": None, "status": None}
    body = {"text": "alpha beta", **fields}
    with httpx.stream("POST", server.base + "/generate_stream", json=body, timeout=60) as response:
        out["status"] = response.status_code
        for event, data in sse_events(response.iter_lines()):
            if event == "message":
                if not out["tokens"]:
                    started.release()
                out["tokens"].append(data)
            else:
                out[event] = json.loads(data)
    return out


def test_sigkill_reader_retries_unstarted_and_fails_started(liftoff: Any) -> None:
    # r1 is not restarted, so that everything after its death goes to r2 (restarts: test_restarts.py).
    readers = {"r1": echo_reader(delay_ms=50, batch=1, restart_policy="never"),
               "r2": echo_reader(delay_ms=50, batch=1)}  # fmt: skip
    server = liftoff(readers=readers).start()
    server.wait_live(2)
    pid = server.readers()["r1"]["pids"][0]
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_stream, server, started, **LONG) for _ in range(4)]
        for _ in range(2):  # one request running on each reader, one waiting behind it
            assert started.acquire(timeout=20)
        wait_until(lambda: server.http.get(server.mgmt + "/reader/r1").json()["active_requests"] == 2)
        os.kill(pid, signal.SIGKILL)
        # Shown dead within two heartbeat_check_intervals (1 s each).
        wait_until(lambda: "r1" in server.readers("dead"), timeout=2.0, what="r1 in dead_readers")
        results = [future.result(timeout=60) for future in futures]
    failed = [r for r in results if r["error"] is not None]
    assert len(failed) == 1, results
    assert failed[0]["error"]["error_type"] == "reader_died"
    assert failed[0]["tokens"], "the failed request had started streaming"
    succeeded = [r for r in results if r["error"] is None]
    assert len(succeeded) == 3
    assert all(r["metadata"]["reader_id"] == "r2" for r in succeeded)
    assert all(len(r["tokens"]) == TOKENS for r in succeeded)
    dead = server.http.get(server.mgmt + "/reader/r1").json()
    assert dead["state"] == "dead"
    assert dead["pids"] == []
    assert server.generate("after", **LONG).json()["metadata"]["reader_id"] == "r2"


def test_sigkill_buffered_request_fails_with_503(liftoff: Any) -> None:
    # A group whose last reader is dead for good (here: never restarted) fails its waiting requests at once.
    readers = {"r1": echo_reader(delay_ms=50, batch=1, restart_policy="never")}
    server = liftoff(readers=readers, server={"reserved_consumers": ""}).start()
    pid = server.readers()["r1"]["pids"][0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(server.generate, "a b", **LONG) for _ in range(2)]
        wait_until(lambda: server.http.get(server.mgmt + "/reader/r1").json()["active_requests"] == 2)
        time.sleep(0.2)  # let the first request emit tokens
        os.kill(pid, signal.SIGKILL)
        responses = [future.result(timeout=30) for future in futures]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [503, 503], [r.text for r in responses]
    types = sorted(response.json()["error_type"] for response in responses)
    # The started request lost its reader; the other one had no reader left to go to.
    assert types == ["reader_died", "unavailable"]
    # Once its process's exit is heard, the reason says why it stays dead.
    dead = wait_until(lambda: (d := server.http.get(server.mgmt + "/reader/r1").json())["error"].endswith(
        "(not restarted: restart_policy is never)") and d)  # fmt: skip
    assert (dead["state"], dead["restarts"], dead["next_restart_ms"]) == ("dead", 0, None)


def test_silent_reader_is_dead_and_its_request_fails(liftoff: Any) -> None:
    server = liftoff(
        readers={"r1": echo_reader(delay_ms=50, batch=1)}, server={"reader_message_timeout_ms": 500}
    ).start()
    pid = server.readers()["r1"]["pids"][0]
    started = threading.Semaphore(0)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_stream, server, started, min_new_tokens=500, max_new_tokens=500)
            assert started.acquire(timeout=20)
            os.kill(pid, signal.SIGSTOP)
            result = future.result(timeout=30)
        assert result["error"]["error_type"] == "reader_died"
        assert "silent" in result["error"]["detail"]
        wait_until(lambda: "r1" in server.readers("dead"), what="r1 dead")
        # The gateway stops what it no longer trusts: the frozen process is killed.
        wait_until(lambda: not process_alive(pid), timeout=15, what="the frozen reader to be killed")
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGCONT)


def test_reserved_group_buffers_until_a_reader_is_live(liftoff: Any) -> None:
    server = liftoff().start(wait=None)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.generate, "buffered request")
        time.sleep(0.3)
        assert not future.done()
        created = server.http.post(server.mgmt + "/reader", json=echo_reader(load_delay_ms=300))
        assert created.status_code == 201
        response = future.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "buffered request"}


def test_reserved_buffer_has_a_deadline(liftoff: Any) -> None:
    server = liftoff(server={"reserved_buffer_timeout_s": 0.5}).start(wait=None)
    response = server.generate("nobody home")
    assert response.status_code == 503
    assert response.json()["error_type"] == "unavailable"
    assert "primary" in response.json()["detail"]


def test_non_reserved_groups_fail_fast(liftoff: Any) -> None:
    readers = {"slow": echo_reader("other", load_delay_ms=60_000)}
    server = liftoff(readers=readers).start(wait="loading")
    loading = server.generate("x", consumer_group="other")
    assert loading.status_code == 503
    assert loading.json()["error_type"] == "unavailable"
    unknown = server.generate("x", consumer_group="nope")
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["detail"]
    stream = server.http.post(server.base + "/generate_stream", json={"text": "x", "consumer_group": "other"})
    assert stream.status_code == 503


def _active(server: Any, reader_id: str) -> int:
    value: int = server.http.get(server.mgmt + f"/reader/{reader_id}").json()["active_requests"]
    return value


def test_stream_disconnect_cancels_at_the_reader(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=20, batch=1)}).start()
    body = {"text": "never ending", "min_new_tokens": 100_000, "max_new_tokens": 100_000}
    with httpx.stream("POST", server.base + "/generate_stream", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert _active(server, "r1") == 1 or wait_until(lambda: _active(server, "r1") == 1)
    wait_until(lambda: _active(server, "r1") == 0, what="the reader to free the slot")
    assert server.generate("next one").json() == {"text": "next one"}


def test_buffered_disconnect_cancels_at_the_reader(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=20, batch=1)}).start()
    body = {"text": "never ending", "min_new_tokens": 100_000, "max_new_tokens": 100_000}
    with contextlib.suppress(httpx.ReadTimeout):
        server.http.post(server.base + "/generate", json=body, timeout=1.0)
    wait_until(lambda: _active(server, "r1") == 0, what="the reader to free the slot")
    assert server.generate("next one").json() == {"text": "next one"}
