"""The Redis broker with a password and with TLS: gateways and readers authenticate with the URL's password
(``redis://:PASSWORD@host``), ``rediss://`` URLs (with their TLS options) reach every process unchanged, and the
password shows in no log, no command line and no answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LiftoffServer, echo_reader, wait_until
from tests.redis_server import RedisServer

PASSWORD = "redis-password-for-the-tests"


@pytest.fixture(params=["redis", "rediss"])
def secured_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """Redis requiring a password; for ``rediss`` also TLS only (a self-signed certificate for 127.0.0.1)."""
    server = RedisServer(tmp_path / "redis", password=PASSWORD, tls=request.param == "rediss").start()
    try:
        yield server
    finally:
        server.stop()


def _reader(url: str, reader_id: str, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "liftoff", "reader", "--broker", url, "--reader-id", reader_id,
               "--model-name", "echo", "--consumer-group", "edge"]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))


def test_gateways_and_readers_authenticate_to_redis(liftoff: type[LiftoffServer], secured_redis: RedisServer,
                                                    tmp_path: Path) -> None:  # fmt: skip
    url = secured_redis.url
    server = liftoff(readers={"r1": echo_reader()}, server={"broker": url}).start()
    assert server.generate("through redis", return_metadata=True).json()["metadata"]["reader_id"] == "r1"
    headless = _reader(url, "headless", tmp_path / "headless.log")
    intruder = _reader(url.replace(PASSWORD, "not-the-password"), "intruder", tmp_path / "intruder.log")
    try:
        wait_until(lambda: "headless" in server.readers(), what="the headless reader with the password")
        assert server.generate("edge", consumer_group="edge").json() == {"text": "edge"}
        wait_until(lambda: "invalid username-password" in (tmp_path / "intruder.log").read_text(), what="refusal")
        assert "intruder" not in json.dumps(server.status())
        (pid,) = server.readers()["r1"]["pids"]
        assert PASSWORD not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()  # given in its environment
    finally:
        for process in (headless, intruder):
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    for text in (server.log(), (tmp_path / "intruder.log").read_text(), json.dumps(server.status())):
        assert PASSWORD not in text
    assert ":***@127.0.0.1" in server.log()  # the URL is logged, without its password


def test_a_gateway_without_the_password_serves_nothing_and_says_why(liftoff: type[LiftoffServer],
                                                                    secured_redis: RedisServer) -> None:  # fmt: skip
    url = secured_redis.url.replace(f":{PASSWORD}@", "")
    server = liftoff(server={"broker": url}).start(wait=None)
    wait_until(lambda: "is unreachable (AuthenticationError" in server.log(), what="the reason in the log")
    response = server.generate("x")
    assert response.status_code == 503
    assert response.json()["error_type"] == "broker_unavailable"
    assert "127.0.0.1" not in response.json()["detail"]  # clients are not told where Redis is
