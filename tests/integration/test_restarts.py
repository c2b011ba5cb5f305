"""Self-healing readers: a reader the gateway started that crashes, is killed or is declared dead comes back with
the same id (``restart_policy``, backoff, crash-loop limit), and the requests waiting for it are served then."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
from typing import Any

import httpx

from tests.helpers import LiftoffServer, echo_reader, process_alive, processes_matching, wait_until
from tests.integration.test_liveness import LONG, _stream

# Groups here are not reserved: what buffers while a reader is away is the restart, nothing else.
NOT_RESERVED = {"reserved_consumers": ""}


def detail(server: LiftoffServer, reader_id: str) -> dict[str, Any]:
    response = server.http.get(server.mgmt + f"/reader/{reader_id}")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def restarts_metric(server: LiftoffServer, reader_id: str) -> float | None:
    text = server.http.get(server.mgmt + "/metrics").text
    found = re.search(rf'^liftoff_reader_restarts_total{{reader="{reader_id}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def live_again(server: LiftoffServer, reader_id: str, old_pid: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the reader is live in a new process; its ``GET /reader`` detail."""
    wait_until(lambda: (info := server.readers().get(reader_id)) and info["pids"] and info["pids"] != [old_pid],
               timeout, what=f"{reader_id} to be live again")  # fmt: skip
    server.track_pids()
    return detail(server, reader_id)


def test_a_killed_reader_comes_back_and_serves_what_waited(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=50, batch=1)}, server=NOT_RESERVED).start()
    pid = server.readers()["r1"]["pids"][0]
    assert detail(server, "r1")["restarts"] == 0
    assert restarts_metric(server, "r1") == 0
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(_stream, server, started, **LONG)
        assert started.acquire(timeout=20)
        prefetched = pool.submit(server.generate, "was waiting", return_metadata=True)
        wait_until(lambda: detail(server, "r1")["active_requests"] == 2, what="a second request at the reader")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: detail(server, "r1")["next_restart_ms"] is not None, what="a restart to be due")
        down = detail(server, "r1")
        assert "r1" in server.readers("dead")
        assert "restarting in" in down["error"]
        while_down = pool.submit(server.generate, "sent while it was down", return_metadata=True)
        failed = running.result(timeout=60)
        assert failed["error"]["error_type"] == "reader_died"  # it had started: it fails once, clearly
        for future, text in ((prefetched, "was waiting"), (while_down, "sent while it was down")):
            response = future.result(timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["text"] == text
            assert response.json()["metadata"]["reader_id"] == "r1"
    back = live_again(server, "r1", pid)
    assert (back["state"], back["restarts"], back["restart_policy"]) == ("live", 1, "on-failure")
    assert "SIGKILL" in back["last_exit"]
    assert back["next_restart_ms"] is None
    assert restarts_metric(server, "r1") == 1
    assert server.generate("again").json() == {"text": "again"}
    assert "loading_readers" in server.status()["status"]  # /status keeps Takeoff's schema
    assert set(server.status()["status"]) == {"dead_readers", "last_heartbeat", "live_readers", "loading_readers",
                                              "reserved_consumers"}  # fmt: skip


def test_a_reader_declared_dead_for_silence_is_stopped_and_restarted(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=50, batch=1)},
                     server={"reader_message_timeout_ms": 500}).start()  # fmt: skip
    pid = server.readers()["r1"]["pids"][0]
    started = threading.Semaphore(0)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_stream, server, started, min_new_tokens=500, max_new_tokens=500)
            assert started.acquire(timeout=20)
            os.kill(pid, signal.SIGSTOP)  # frozen: silent with a request in flight
            assert future.result(timeout=30)["error"]["error_type"] == "reader_died"
        back = live_again(server, "r1", pid)
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert not process_alive(pid)
    assert back["restarts"] == 1
    assert "silent" in back["last_exit"]
    assert server.generate("after the freeze").json() == {"text": "after the freeze"}


def test_a_crash_loop_stops_after_the_limit(liftoff: Any) -> None:
    readers = {"r1": echo_reader(crash_after_ms=300)}
    server = liftoff(readers=readers, server={**NOT_RESERVED, "reader_max_restarts": 2}).start(wait="loading")
    wait_until(lambda: "crash loop" in (detail(server, "r1")["error"] or ""), timeout=90, what="the crash loop")
    server.track_pids()
    dead = detail(server, "r1")
    assert dead["state"] == "dead"
    assert dead["restarts"] == 2
    assert dead["next_restart_ms"] is None
    assert "restarted 2 times" in dead["error"]
    assert "code 70" in dead["error"]  # the last failure
    assert restarts_metric(server, "r1") == 2
    time.sleep(2.5)  # longer than the next backoff would have been: nothing starts it again
    assert detail(server, "r1")["state"] == "dead"
    assert detail(server, "r1")["restarts"] == 2
    assert server.generate("anyone?").status_code == 503  # its group is dead for good: it fails at once


def test_a_reader_that_fails_to_load_is_not_restarted(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(fail_load="bad weights")}, server=NOT_RESERVED).start(wait="loading")
    wait_until(lambda: "r1" in server.readers("dead"), what="r1 dead")
    time.sleep(2.5)  # past the first backoff
    dead = detail(server, "r1")
    assert (dead["state"], dead["restarts"], dead["next_restart_ms"]) == ("dead", 0, None)
    assert "bad weights" in dead["error"]


def test_a_deleted_reader_is_never_restarted(liftoff: Any) -> None:
    readers = {"killed": echo_reader("a"), "deleted": echo_reader("b")}
    server = liftoff(readers=readers, server=NOT_RESERVED).start()
    server.wait_live(2)
    killed = server.readers()["killed"]["pids"][0]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: detail(server, "killed")["next_restart_ms"] is not None, what="a restart to be due")
    for reader_id in ("killed", "deleted"):  # one while its restart is due, one live
        assert server.http.delete(server.mgmt + f"/reader/{reader_id}").status_code == 204
    time.sleep(2.5)  # past the restart that was due
    status = server.status()["status"]
    assert not any(status[key] for key in ("live_readers", "loading_readers", "dead_readers"))
    assert not processes_matching(server.internal_address)


def test_shutdown_with_a_restart_due_leaves_no_process(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    pid = server.readers()["r1"]["pids"][0]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: detail(server, "r1")["next_restart_ms"] is not None, what="a restart to be due")
    assert server.stop(signal.SIGTERM) == 0  # and no reader process outlives it (checked by stop)
    assert "Liftoff stopped" in server.log()


def test_restart_policy_always_restarts_a_clean_exit_and_on_failure_does_not(liftoff: Any) -> None:
    readers = {"always": echo_reader("a", restart_policy="always"), "on-failure": echo_reader("b")}
    server = liftoff(readers=readers, server=NOT_RESERVED).start()
    pids = {reader_id: info["pids"][0] for reader_id, info in server.wait_live(2).items()}
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)  # not the gateway's doing: the reader drains and exits 0
    back = live_again(server, "always", pids["always"])
    assert back["restarts"] == 1
    assert "code 0" in back["last_exit"]
    stopped = wait_until(lambda: "restart_policy is on-failure" in ((d := detail(server, "on-failure"))["error"] or "")
                         and d, what="the clean exit to be judged")  # fmt: skip
    assert (stopped["state"], stopped["restarts"], stopped["next_restart_ms"]) == ("dead", 0, None)
    assert "code 0" in stopped["error"]


def test_the_redis_broker_restarts_a_killed_reader_too(liftoff: Any, redis_server: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=20)},
                     server={**NOT_RESERVED, "broker": redis_server.url}).start()  # fmt: skip
    pid = server.readers()["r1"]["pids"][0]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: detail(server, "r1")["next_restart_ms"] is not None, what="a restart to be due")
    with httpx.Client(timeout=60) as client:
        response = client.post(server.base + "/generate", json={"text": "sent while it was down"})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "sent while it was down"}
    back = live_again(server, "r1", pid)
    assert back["restarts"] == 1
