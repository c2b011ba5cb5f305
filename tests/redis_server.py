"""A real ``redis-server`` for the tests: started on a free loopback port, without persistence, stopped after."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import free_ports


def redis_server_binary() -> str:
    """The path of ``redis-server``; the test skips when it is not installed (``make test`` installs it)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server)")
    return path


class RedisServer:
    """One ``redis-server`` process on loopback; ``restart`` brings it back empty on the same port."""

    def __init__(self, workdir: Path, bind: str = "127.0.0.1") -> None:
        self.binary = redis_server_binary()
        self.bind = bind  # addresses to listen on, space-separated
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        command = [self.binary, "--port", str(self.port), "--bind", *self.bind.split(), "--save", "",
                   "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, wait ``down_s`` seconds, start again on the same port (empty: no persistence)."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
