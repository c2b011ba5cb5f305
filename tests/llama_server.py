"""A real ``llama-server`` (llama.cpp's OpenAI-compatible server) for the API reader tests.

The binary is the one ``bench/generation.py`` uses, built once from the llama-cpp-python sdist into
``~/.cache/liftoff/peers`` (outside the clone, like the Makefile's wheel): ``make llama-server`` builds it, and
so does the test session when a collected test needs it and it is missing (tests/models/conftest.py). It serves
the bundled SmolLM2 GGUF on a free loopback port.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from tests.helpers import free_ports, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _peers() -> ModuleType:
    """``bench/genbench_peers.py``, which knows how to build llama-server (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("genbench_peers", ROOT / "bench" / "genbench_peers.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_server_binary() -> Path:
    """Where the cached build lives (it may not exist yet)."""
    peers = _peers()
    path: Path = peers.llama_server_binary(peers.DEFAULT_PEERS_DIR)
    return path


def ensure_llama_server() -> Path:
    """The binary, built now if it is missing (4-5 minutes on 2 cores, once per machine)."""
    peers = _peers()
    path: Path = peers.ensure_llama_server(peers.DEFAULT_PEERS_DIR)
    return path


class LlamaServer:
    """One ``llama-server`` process on loopback, serving ``gguf``; ``kill`` and ``start`` again on the same port."""

    def __init__(self, gguf: Path, workdir: Path, *, slots: int = 4, extra: tuple[str, ...] = ()) -> None:
        self.binary = llama_server_binary()
        self.gguf = gguf
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.flags = ["-t", "1", "-np", str(slots), "-c", str(1024 * slots), "--no-kv-unified", "--metrics", *extra]
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=30)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        """The OpenAI ``api_base``."""
        return self.root + "/v1"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        command = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                   *self.flags]  # fmt: skip
        log = (self.workdir / "llama-server.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama-server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def _healthy(self) -> bool:
        try:
            return self.http.get(self.root + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """Stop it at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.http.close()

    def log(self) -> str:
        path = self.workdir / "llama-server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metric(self, name: str) -> float:
        """One ``llamacpp:`` counter or gauge of its Prometheus ``/metrics``."""
        for line in self.http.get(self.root + "/metrics").text.splitlines():
            if line.startswith(f"llamacpp:{name} "):
                return float(line.split()[1])
        raise AssertionError(f"llama-server has no metric llamacpp:{name}")

    def busy_slots(self) -> int:
        """Slots generating now (``GET /slots``)."""
        slots: list[dict[str, Any]] = self.http.get(self.root + "/slots").json()
        return sum(1 for slot in slots if slot.get("is_processing"))
