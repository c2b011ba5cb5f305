"""Test helpers: run a real Liftoff gateway (and its reader processes) on free loopback ports."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import yaml

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

PORT_KEYS = ("port", "management_port", "vertex_port", "openai_port", "snowflake_port", "sagemaker_port",
             "internal_port")  # fmt: skip


def stop_process(process: subprocess.Popen[Any] | None, grace_s: float = 10.0) -> None:
    """Stop a server process a test started: SIGTERM, then SIGKILL if it is still there after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _bench_ports() -> ModuleType:
    """``bench/common/ports.py``, loaded by path: the one ``free_ports`` of the repository, which the bench scripts
    import as ``common.ports``. The tests do not need ``bench/`` to be importable (it is not a package and is not on
    ``sys.path``); that file imports only the standard library."""
    spec = importlib.util.spec_from_file_location("liftoff_bench_ports", ROOT / "bench" / "common" / "ports.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


free_ports: Callable[[int], list[int]] = _bench_ports().free_ports  # ``count`` distinct free TCP ports on loopback


class PortKeys(httpx.Auth):
    """Send each port the key it needs (``Authorization: Bearer``), as a client of a keyed gateway would."""

    def __init__(self, by_port: dict[int, str]) -> None:
        self.by_port = by_port

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        key = self.by_port.get(request.url.port or 0)
        if key is not None and "authorization" not in request.headers:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request


def first_key(value: Any) -> str | None:
    """The first key of a ``server_config`` keys value (a comma-separated string or a list), or None."""
    keys = value.split(",") if isinstance(value, str) else list(value or [])
    return str(keys[0]).strip() if keys else None


_ECHO_OPTIONS = ("load_delay_ms", "fail_load", "crash_after_ms")


def echo_reader(group: str = "primary", *, delay_ms: float = 0, batch: int = 8, **options: Any) -> dict[str, Any]:
    """An echo reader's config; ``load_delay_ms``, ``fail_load`` and ``crash_after_ms`` go to its backend options."""
    backend_options = {"token_delay_ms": delay_ms}
    backend_options.update({key: options.pop(key) for key in _ECHO_OPTIONS if key in options})
    return {"model_name": "echo", "device": "cpu", "consumer_group": group, "max_batch_size": batch,
            "backend_options": backend_options, **options}  # fmt: skip


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` for every ``data:`` line of a server-sent event stream (``message`` unless named)."""
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, line[6:]
        elif line == "":
            event = "message"


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = predicate()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate} (last value: {last!r})")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_matching(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


class LiftoffServer:
    """One ``liftoff serve`` process with its own config file and free ports."""

    def __init__(
        self,
        *,
        workdir: Path,
        readers: dict[str, dict[str, Any]] | None = None,
        server: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        config_file: bool = True,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))
        self.server_config = {**self.ports, "host": "127.0.0.1", "repository_path": str(workdir / "artefacts"),
                              "shutdown_timeout_s": 10, **(server or {})}  # fmt: skip
        self.config_path = workdir / "config.yaml"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = list(args or [])
        if config_file:
            body: dict[str, Any] = {"server_config": self.server_config}
            if readers:
                body["readers_config"] = readers
            self.config_path.write_text(yaml.safe_dump({"takeoff": body}))
            self.args = ["--config", str(self.config_path), *self.args]
        else:
            for key, value in self.server_config.items():
                self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = workdir / "liftoff.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=30, auth=PortKeys(self.keys_by_port()))
        self.seen_pids: set[int] = set()

    def keys_by_port(self) -> dict[int, str]:
        """The key of each port of a gateway with ``api_keys`` or ``management_api_keys`` (none without)."""
        inference = first_key(self.server_config.get("api_keys"))
        management = first_key(self.server_config.get("management_api_keys"))
        keys = {port: inference for key, port in self.ports.items() if key not in ("management_port", "internal_port")}
        keys[self.ports["management_port"]] = management  # type: ignore[assignment]
        return {port: key for port, key in keys.items() if key}

    # ---- addresses ----------------------------------------------------------------------------------------------

    def url(self, key: str = "port") -> str:
        return f"http://127.0.0.1:{self.ports[key]}"

    @property
    def base(self) -> str:
        return self.url("port")

    @property
    def mgmt(self) -> str:
        return self.url("management_port")

    @property
    def internal_address(self) -> str:
        return f"127.0.0.1:{self.ports['internal_port']}"

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, *, wait: str | None = "live", timeout: float = 30.0) -> LiftoffServer:
        """Start the gateway; wait until a reader is ``live`` (or ``loading``, or just until it answers)."""
        log = self.log_path.open("ab")
        command = [sys.executable, "-m", "liftoff", "serve", *self.args]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        log.close()
        query = f"?state={wait}" if wait else "?state=loading"
        expect = (200,) if wait else (200, 503)
        wait_until(lambda: self._answers(self.mgmt + "/healthz" + query, expect), timeout, what="the gateway")
        self.track_pids()
        return self

    def _answers(self, url: str, expect: tuple[int, ...]) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"liftoff exited with {self.process.returncode}:\n{self.log()}")
        return self.http.get(url, timeout=2).status_code in expect

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        response = self.http.get(self.mgmt + "/status")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def readers(self, state: str = "live") -> dict[str, Any]:
        readers: dict[str, Any] = self.status()["status"][f"{state}_readers"]
        return readers

    def track_pids(self) -> set[int]:
        """Remember every reader pid the status shows (to check for orphans later)."""
        for state in ("loading", "live", "dead"):
            for info in self.readers(state).values():
                self.seen_pids.update(info["pids"])
        return self.seen_pids

    def wait_live(self, count: int, timeout: float = 30.0) -> dict[str, Any]:
        readers = wait_until(lambda: len(self.readers()) >= count and self.readers(), timeout, what=f"{count} live")
        self.track_pids()
        return readers

    def generate(self, text: str | list[str], **fields: Any) -> httpx.Response:
        return self.http.post(self.base + "/generate", json={"text": text, **fields})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the gateway with ``sig``; return its exit code; fail if any reader process outlives it."""
        assert self.process is not None
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            self.track_pids()
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.assert_no_orphans()
        return code

    def assert_no_orphans(self, timeout: float = 10.0) -> None:
        marker = f"127.0.0.1:{self.ports['internal_port']}"
        wait_until(
            lambda: not processes_matching(marker) and not [p for p in self.seen_pids if process_alive(p)],
            timeout,
            what="reader processes to exit",
        )

    def close(self) -> None:
        """Teardown: stop if running, then kill anything left."""
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        marker = f"127.0.0.1:{self.ports['internal_port']}"
        leftovers = processes_matching(marker) + [p for p in self.seen_pids if process_alive(p)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"reader processes outlived the gateway: {leftovers}\n{self.log()}"
