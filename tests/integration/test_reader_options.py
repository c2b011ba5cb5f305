"""Reader options that act on the reader's process and its groups: every one is honoured, none silently dropped
(``cuda_visible_devices``, ``reader_log_as_json``, ``buffer_requests``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import echo_reader, wait_until


def environment(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_a_spawned_reader_runs_with_its_cuda_visible_devices_and_log_format(liftoff: Any) -> None:
    readers = {"gpu1": echo_reader("a", cuda_visible_devices="1", reader_log_as_json=True), "plain": echo_reader("b")}
    server = liftoff(readers=readers).start()
    pids = {reader_id: info["pids"][0] for reader_id, info in server.wait_live(2).items()}
    assert environment(pids["gpu1"])["CUDA_VISIBLE_DEVICES"] == "1"
    assert environment(pids["plain"]).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert server.http.get(server.mgmt + "/reader/gpu1").json()["notes"] == []  # both honoured, neither noted
    log = server.log()
    roles = {line["role"] for line in json_lines(log)}
    assert roles == {"reader gpu1"}  # only that reader's lines are JSON; the gateway and the other stay text
    assert "[reader gpu1]" not in log
    assert "[reader plain]" in log
    assert "[gateway]" in log


def test_a_headless_reader_applies_them_itself(liftoff: Any, tmp_path: Path) -> None:
    server = liftoff().start(wait=None)
    command = [sys.executable, "-m", "liftoff", "reader", "--gateway", server.internal_address, "--reader-id", "remote",
               "--model-name", "echo", "--cuda-visible-devices", "2,3", "--reader-log-as-json",
               "--restart-policy", "never"]  # fmt: skip
    log_path = tmp_path / "reader.log"
    with log_path.open("ab") as log:
        reader = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "remote" in server.readers(), what="the headless reader to be live")
        messages = [line["msg"] for line in json_lines(log_path.read_text())]
        assert "reader remote: CUDA_VISIBLE_DEVICES=2,3 (cuda_visible_devices)" in messages
        assert any(message.startswith("restart_policy applies to readers a gateway starts") for message in messages)
        detail = server.http.get(server.mgmt + "/reader/remote").json()
        assert (detail["managed"], detail["restart_policy"]) == (False, None)  # nobody here restarts it
        reader.send_signal(signal.SIGTERM)
        assert reader.wait(20) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_buffer_requests_makes_its_groups_wait_for_a_live_reader(liftoff: Any) -> None:
    server = liftoff(readers={"base": echo_reader()}, server={"reserved_consumers": ""}).start()
    created = server.http.post(server.mgmt + "/reader", json=echo_reader("side", load_delay_ms=1500,
                                                                          buffer_requests=True))  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.json()["reader_id"] in server.readers("loading")
    response = server.generate("waited for it", consumer_group="side")  # buffered, not refused with 503
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "waited for it"}
    server.track_pids()
