"""``liftoff reader``: a headless reader joins a running gateway through its internal port."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import wait_until


def _reader(server: Any, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "liftoff", "reader", "--gateway", server.internal_address, *args]
    with (tmp_path / "reader.log").open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def test_headless_reader_joins_serves_and_leaves(liftoff: Any, tmp_path: Path) -> None:
    server = liftoff().start(wait=None)
    reader = _reader(server, tmp_path, "--reader-id", "remote", "--model-name", "echo", "--consumer-group", "edge")
    try:
        wait_until(lambda: "remote" in server.readers(), what="the headless reader to be live")
        info = server.readers()["remote"]
        assert info["consumer_groups"] == ["edge"]
        assert info["pids"] == [reader.pid]
        assert server.generate("from afar", consumer_group="edge").json() == {"text": "from afar"}
        assert server.http.get(server.mgmt + "/config/remote").json()["model_name"] == "echo"
        reader.send_signal(signal.SIGTERM)
        assert reader.wait(20) == 0
        wait_until(lambda: "remote" in server.readers("dead"), what="the stopped reader to be dead")
    finally:
        if reader.poll() is None:
            reader.kill()


def test_deleting_a_headless_reader_stops_it(liftoff: Any, tmp_path: Path) -> None:
    server = liftoff().start(wait=None)
    reader = _reader(server, tmp_path, "--reader-id", "remote", "--model-name", "echo")
    try:
        wait_until(lambda: "remote" in server.readers())
        assert server.http.delete(server.mgmt + "/reader/remote").status_code == 204
        assert reader.wait(20) == 0
    finally:
        if reader.poll() is None:
            reader.kill()


def test_headless_reader_waits_for_its_gateway(liftoff: Any, tmp_path: Path) -> None:
    server = liftoff()
    reader = _reader(server, tmp_path, "--reader-id", "early", "--model-name", "echo")
    try:
        server.start(wait="live")
        assert "early" in server.readers()
    finally:
        reader.kill()
        reader.wait()


def test_duplicate_reader_id_is_refused(liftoff: Any, tmp_path: Path) -> None:
    server = liftoff().start(wait=None)
    first = _reader(server, tmp_path, "--reader-id", "same", "--model-name", "echo")
    second = None
    try:
        wait_until(lambda: "same" in server.readers())
        second = _reader(server, tmp_path, "--reader-id", "same", "--model-name", "echo")
        wait_until(lambda: "already connected" in (tmp_path / "reader.log").read_text(), what="the refusal")
        assert server.readers()["same"]["pids"] == [first.pid]
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait()
