"""Graceful shutdown: in-flight requests finish, readers stop, exit code 0, no orphan processes."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from typing import Any

import httpx

from tests.helpers import echo_reader, process_alive, wait_until


def _read_stream(url: str, body: dict[str, Any], first: threading.Event) -> list[str]:
    tokens = []
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                tokens.append(line[6:])
                first.set()
    return tokens


def test_sigterm_finishes_in_flight_requests_then_exits_0(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(delay_ms=30), "r2": echo_reader("other")}).start()
    server.wait_live(2)
    pids = [info["pids"][0] for info in server.readers().values()]
    first = threading.Event()
    body = {"text": "a b c", "min_new_tokens": 40, "max_new_tokens": 40}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_read_stream, server.base + "/generate_stream", body, first)
        buffered = pool.submit(server.generate, "x y", min_new_tokens=40, max_new_tokens=40)
        assert first.wait(20)
        assert server.stop(signal.SIGTERM) == 0
        assert len(stream.result(timeout=30)) == 40
        assert buffered.result(timeout=30).status_code == 200
    assert not any(process_alive(pid) for pid in pids)
    assert "Liftoff stopped" in server.log()


def test_sigint_also_stops_cleanly(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader()}).start()
    assert server.stop(signal.SIGINT) == 0


def test_killed_gateway_leaves_no_orphans(liftoff: Any) -> None:
    server = liftoff(readers={"r1": echo_reader(), "r2": echo_reader()}).start()
    pids = [info["pids"][0] for info in server.wait_live(2).values()]
    server.process.kill()
    server.process.wait(10)
    wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=10, what="readers to die with the gateway")


def test_port_in_use_fails_with_a_clear_message(liftoff: Any) -> None:
    first = liftoff().start(wait=None)
    clash = liftoff(server={"management_port": first.ports["management_port"]})
    clash.process = None
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "liftoff", "serve", *clash.args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{first.ports['management_port']} (management_port)" in result.stderr
    assert os.path.exists(clash.config_path)
