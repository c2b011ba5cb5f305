"""A real ``redis-server`` for the tests: started on a free loopback port, without persistence, stopped after;
optionally with a password (``requirepass``) and TLS only (a self-signed certificate made with ``openssl``)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import free_ports, stop_process


def redis_server_binary() -> str:
    """The path of ``redis-server``; the test skips when it is not installed (``make test`` installs it)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server)")
    return path


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (``openssl``; the test skips without it): its own CA too."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for the TLS test (Debian: apt-get install openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    return cert, key


class RedisServer:
    """One ``redis-server`` process on loopback; ``restart`` brings it back empty on the same port. With
    ``password`` it requires it (``requirepass``); with ``tls`` it speaks TLS only (``rediss://``)."""

    def __init__(self, workdir: Path, bind: str = "127.0.0.1", password: str | None = None, tls: bool = False) -> None:
        self.binary = redis_server_binary()
        self.bind = bind  # addresses to listen on, space-separated
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None
        self.password = password
        self.certificate: tuple[Path, Path] | None = self_signed_certificate(workdir) if tls else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.certificate is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificate[0]}"

    def client(self) -> redis.Redis:
        if self.certificate is not None:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, password=self.password, ssl=True,
                               ssl_ca_certs=str(self.certificate[0]))  # fmt: skip
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, password=self.password)

    def _listen(self) -> list[str]:
        """The options that say where and how it listens."""
        if self.certificate is None:
            listen = ["--port", str(self.port)]
        else:
            cert, key = self.certificate
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                      str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
        return listen + (["--requirepass", self.password] if self.password else [])

    def start(self) -> RedisServer:
        command = [self.binary, *self._listen(), "--bind", *self.bind.split(), "--save", "",
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
            except (redis.ConnectionError, redis.AuthenticationError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, wait ``down_s`` seconds, start again on the same port (empty: no persistence)."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
