"""Gateway overhead benchmark: what Liftoff's HTTP gateway costs on top of a bare uvicorn + Starlette app.

What it measures (echo readers with no token delay, so the model costs nothing and the gateway is the work):

1. ``POST /generate`` (a short prompt, exactly 2 tokens, not streamed) from ``--concurrency`` keep-alive
   clients: successful requests/s, p50 and p99 latency, errors (a status other than 200, a body other than the
   first answer's, a broken connection, no answer within ``--request-timeout``).
2. The same load against a minimal uvicorn + Starlette app (one endpoint that reads the body and returns
   ``{"text": "hello"}``, same uvicorn settings: httptools, uvloop, no access log, one worker), and the ratio
   Liftoff / minimal (target >= 0.5).
3. The SSE relay: ``POST /generate_stream`` with ``min_new_tokens = max_new_tokens = --stream-tokens`` from
   ``--stream-concurrency`` clients: relayed tokens/s, counted from the ``data:`` events received (target
   >= 20,000/s), and that every stream delivered exactly ``--stream-tokens`` events. The minimal app's peer
   figure comes from an endpoint that streams as many ``data: hello`` events, one chunk each. With no token
   delay the echo reader produces a stream's tokens faster than they are relayed, so Liftoff sends many events
   per HTTP chunk (the report shows how many): this is the relay's bulk throughput.
4. Optional (``--paced-token-delay-ms``): the same stream from a reader that sleeps per token, so events come
   one or two per chunk, as from a real model: the per-chunk cost of the relay. No peer and no target.

It also reports the CPU time of each process (load generator, gateway, readers, minimal app) and of everything
else on the machine during each measurement, as a hint to where the time goes and how noisy the run was.

How it works: this script starts the servers (``python -m liftoff serve --config <tmp>/config.yaml`` and
``python bench/gateway.py --minimal-server PORT``) on free loopback ports in their own process groups, runs
the load generator in its own process (this one: asyncio + uvloop on raw streams, pre-built request bytes,
httptools to parse the answers), and stops every process it started at the end, on Ctrl-C or on an error.
Each phase warms up for ``--warmup`` seconds, then measures for ``--duration`` seconds; requests that end in
the window count. Targets missed are marked MISS; the exit code is 0 unless a server could not start.

Run it from the repository root::

    .venv/bin/python bench/gateway.py                      # defaults: 10 s phases, 64 clients, 1 reader
    .venv/bin/python bench/gateway.py --duration 3 --warmup 1 --json /tmp/gateway.json
    .venv/bin/python bench/gateway.py --paced-token-delay-ms 1   # also the paced stream phase

The figures depend on the machine and on what else runs on it: the CPU table's "other processes" column shows
how much of the machine something else used during each window.

Redis broker (``--broker redis``, code in ``bench/gateway_redis.py``): the script also starts its own
``redis-server`` (``--port P --bind 127.0.0.1 --save '' --appendonly no``, a free loopback port, its own process
group, stopped at the end) and runs, one after the other (only one part's gateways run at a time), the
``POST /generate`` phase (``--concurrency`` clients) against (a) a gateway with the embedded broker, (b) a gateway
with ``broker: redis://...`` and the same echo readers, and (c) two gateways on that Redis (the first is (b)'s,
with the readers in its config; the second has none and uses them through Redis), the load generator sending
half of its connections to each. For (a) and (b) it also measures ``POST /generate`` from
``--latency-concurrency`` clients (default 1: one client, sequential requests), where latency is not queueing:
that is the cleanest "what does Redis add per request" figure (at ``--concurrency`` clients p50 is mostly
queueing in a saturated gateway, so its difference follows the requests/s). The report gives requests/s, p50,
p99 and errors of each, ``Redis p50 - embedded p50`` at both concurrencies against the target (at most 1 ms),
the CPU table with the ``redis-server`` process, and the Redis commands per request (``INFO commandstats``).
The minimal-uvicorn peer and the stream phases are not run in this mode (``--paced-token-delay-ms`` is refused).
``--latency-concurrency``, ``--reader-message-timeout-ms`` (set on every gateway of the run, the embedded one
too) and ``--keep-logs`` are used only in this mode. A gateway that cannot start skips its phases (the others
are still reported) and makes the exit code 1::

    .venv/bin/python bench/gateway.py --broker redis --duration 3 --warmup 1 --json /tmp/gateway-redis.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"
PROMPT = "hello world"
SHORT_TOKENS = 2
MINIMAL_BODY = {"text": "hello"}
TARGET_RATIO = 0.5
TARGET_TOKENS_PER_S = 20_000
READ_SIZE = 256 * 1024
PACED_GROUP = "paced"
LIFTOFF_PORT_KEYS = (
    "port",
    "management_port",
    "vertex_port",
    "openai_port",
    "snowflake_port",
    "internal_port",
    "sagemaker_port",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def log(message: str) -> None:
    """Progress goes to stderr; the report goes to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- the minimal peer server -------------------------------------------------------------------------------------


def uvicorn_settings() -> dict[str, Any]:
    """The uvicorn settings of the peer: those of Liftoff's gateway (``liftoff.gateway.server``, where ``http``
    is ``auto``, which picks httptools, and uvloop is the loop of ``liftoff serve``)."""
    return {"http": "httptools", "loop": "uvloop", "access_log": False, "lifespan": "off", "log_config": None,
            "server_header": False, "workers": 1}  # fmt: skip


def serve_minimal(port: int) -> None:
    """Run the peer: ``POST /generate`` answers ``{"text": "hello"}``; ``POST /generate_stream`` streams events."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def generate(request: Request) -> Response:
        await request.body()
        return JSONResponse(MINIMAL_BODY)

    async def generate_stream(request: Request) -> Response:
        count = int(json.loads(await request.body()).get("max_new_tokens", 1))

        async def events() -> AsyncIterator[bytes]:
            for _ in range(count):
                yield b"data: hello\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
    ]
    uvicorn.run(Starlette(routes=routes), host=HOST, port=port, log_level="warning", **uvicorn_settings())


# ---- processes ---------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when this script dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Managed:
    """One server process this script started; :meth:`stop` ends it and any child it leaves behind."""

    def __init__(self, name: str, command: list[str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.children: set[int] = set()
        self.exit_code: int | None = None
        self.stop_s = 0.0
        self.leftovers: list[int] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(  # its own session: Ctrl-C reaches this script only
                command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        log(f"started {name} (pid {self.process.pid}): {shlex.join(command)}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def track_children(self) -> list[int]:
        """Remember the current children (readers), to check that they end with their parent."""
        kids = children_of(self.pid)
        self.children.update(kids)
        return kids

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; then SIGKILL any remembered child still running."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.track_children()
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM: SIGKILL")
                self.process.kill()
                self.process.wait()
            self.stop_s = time.monotonic() - started
        self.exit_code = self.process.returncode
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.leftovers = [pid for pid in self.children if alive(pid)]
        for pid in self.leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log(f"stopped {self.name}: exit code {self.exit_code} after {self.stop_s:.1f} s; leftovers {self.leftovers}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """Log lines at WARNING or above, and tracebacks."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
        return [line for line in text.splitlines() if any(mark in line for mark in marks)]


def _get_json(url: str, data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(server: Managed, ready: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``ready`` until true; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_running()
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} was not ready within {timeout:.0f} s:\n{server.log_tail()}")


def liftoff_config(ports: dict[str, int], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--readers`` echo readers in the default group, and one paced reader if ``--paced-token-delay-ms``."""

    def echo(delay_ms: float, **extra: Any) -> dict[str, Any]:
        return {"model_name": "echo", "device": "cpu", "max_batch_size": args.batch_size,
                "backend_options": {"token_delay_ms": delay_ms}, **extra}  # fmt: skip

    readers = {f"r{i + 1}": echo(0) for i in range(args.readers)}
    if args.paced_token_delay_ms > 0:
        readers[PACED_GROUP] = echo(args.paced_token_delay_ms, consumer_group=PACED_GROUP)
    server_config = {**ports, "host": HOST, "repository_path": str(workdir / "artefacts"), "shutdown_timeout_s": 10}
    if getattr(args, "api_key", None):
        server_config["api_keys"] = args.api_key  # the inference ports check it on every request
    return {"takeoff": {"server_config": server_config, "readers_config": readers}}


def start_liftoff(
    workdir: Path, args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[Managed, dict[str, int]]:
    """A Liftoff gateway with echo readers (see :func:`liftoff_config`), live; ``stack`` stops it."""
    ports = dict(zip(LIFTOFF_PORT_KEYS, free_ports(len(LIFTOFF_PORT_KEYS)), strict=True))
    return launch_liftoff(workdir, liftoff_config(ports, workdir, args), ports, stack), ports


def launch_liftoff(
    workdir: Path,
    config: dict[str, Any],
    ports: dict[str, int],
    stack: contextlib.ExitStack,
    timeout: float = 60.0,
    *,
    name: str = "liftoff",
    live_readers: int | None = None,
) -> Managed:
    """``liftoff serve`` with ``config`` (a ``{"takeoff": ...}`` document), every reader live; ``stack`` stops it.

    ``live_readers``: the live readers to wait for, if not those of the config (a gateway of a shared broker sees
    other gateways' readers). The log is ``<name>.log`` in ``workdir``."""
    readers = len(config["takeoff"]["readers_config"]) if live_readers is None else live_readers
    (workdir / "config.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "liftoff", "serve", "--config", str(workdir / "config.yaml")]
    server = Managed(name, command, workdir, workdir / f"{name}.log")
    stack.callback(server.stop)
    health = f"http://{HOST}:{ports['management_port']}/healthz"

    def all_live() -> bool:
        status, body = _get_json(health)
        return status == 200 and int(body["live_readers"]) >= readers

    wait_for(server, all_live, timeout)
    log(f"{name} is live with {readers} reader(s): pids {server.track_children()}")
    return server


def start_minimal(workdir: Path, stack: contextlib.ExitStack) -> tuple[Managed, int]:
    """The minimal uvicorn + Starlette peer, answering; ``stack`` stops it."""
    port = free_ports(1)[0]
    command = [sys.executable, str(Path(__file__).resolve()), "--minimal-server", str(port)]
    server = Managed("minimal", command, workdir, workdir / "minimal.log")
    stack.callback(server.stop)
    wait_for(server, lambda: _get_json(f"http://{HOST}:{port}/generate", b"{}")[0] == 200)
    return server, port


# ---- CPU accounting ----------------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    snapshot = {name: sum(process_cpu_s(pid) for pid in pids) for name, pids in groups.items()}
    snapshot["machine"] = machine_busy_s()
    snapshot["wall"] = time.monotonic()
    return snapshot


def cpu_usage(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Percent of one core used by each group over the window; ``other`` is the rest of the machine's load."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    used = {name: (after[name] - before[name]) / wall * 100 for name in before if name not in ("wall", "machine")}
    used["other"] = max(0.0, (after["machine"] - before["machine"]) / wall * 100 - sum(used.values()))
    return used


# ---- the load generator ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One measurement: a target endpoint, a request, a concurrency."""

    key: str
    label: str
    port: int
    path: str
    payload: dict[str, Any]
    concurrency: int
    expect_events: int | None  # SSE: the events each stream must deliver; None: a JSON answer
    cpu_groups: dict[str, list[int]]
    same_body: bool = True  # JSON answers must all equal the first (off where floats may differ in the last bit)
    extra_ports: tuple[int, ...] = ()  # more servers of the same app: the clients are spread over all the ports
    api_key: str = ""  # sent as "Authorization: Bearer" (--api-key), to the peer too, so both parse the same bytes

    def client_ports(self) -> list[int]:
        """The port of each client: round robin over ``port`` and ``extra_ports``."""
        ports = (self.port, *self.extra_ports)
        return [ports[index % len(ports)] for index in range(self.concurrency)]

    def request(self, port: int | None = None) -> bytes:
        body = json.dumps(self.payload, separators=(",", ":")).encode()
        auth = f"\r\nAuthorization: Bearer {self.api_key}" if self.api_key else ""
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{port or self.port}\r\nContent-Type: application/json"
                f"{auth}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body


@dataclass
class Tally:
    """What the clients of one phase saw."""

    t0: int = 0  # perf_counter_ns: measurement window [t0, t1)
    t1: int = 0
    ok: int = 0  # good answers that ended in the window
    latencies: list[int] = field(default_factory=list)  # ns, good answers in the window
    first_events: list[int] = field(default_factory=list)  # ns to the first event, good streams in the window
    window_events: int = 0  # data events received in the window (any stream)
    stream_events: int = 0  # events and HTTP chunks of the good streams that ended in the window
    stream_chunks: int = 0
    streams_checked: int = 0  # streams that ended after t0
    streams_exact: int = 0  # ... with exactly the expected events and no error event
    errors: Counter[str] = field(default_factory=Counter)  # ended after t0
    warmup_errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    expected_body: bytes | None = None
    connections: int = 0  # connections opened (one per client unless the server closes them)

    def error(self, kind: str, when: int) -> None:
        (self.warmup_errors if when < self.t0 else self.errors)[kind] += 1


class Exchange:
    """One response being read (httptools parser callbacks); counts SSE events as they arrive."""

    def __init__(self, tally: Tally, sse: bool) -> None:
        self.tally = tally
        self.sse = sse
        self.parser: Any = None  # set by the connection
        self.reset(0)

    def reset(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.done = False
        self.keep_alive = False
        self.status = 0
        self.parts: list[bytes] = []
        self.tail = b""
        self.events = 0
        self.chunks = 0
        self.error_events = 0
        self.first_event_ns = 0

    def on_body(self, body: bytes) -> None:
        if not self.sse:
            self.parts.append(body)
            return
        blocks = (self.tail + body).split(b"\n\n")
        self.tail = blocks.pop()
        count = sum(1 for block in blocks if block.startswith(b"data:"))
        self.error_events += len(blocks) - count
        if count:
            now = time.perf_counter_ns()
            self.first_event_ns = self.first_event_ns or now
            self.events += count
            if self.tally.t0 <= now < self.tally.t1:
                self.tally.window_events += count

    def on_chunk_complete(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()  # reset once feed_data returns

    def body(self) -> bytes:
        return b"".join(self.parts)


class Connection:
    """One keep-alive HTTP/1.1 connection: write a request, read the response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
        import httptools

        self.reader = reader
        self.writer = writer
        self.exchange = exchange
        self.parser = exchange.parser = httptools.HttpResponseParser(exchange)
        self.busy_since = 0
        self.timed_out = False

    @classmethod
    async def open(cls, port: int, exchange: Exchange) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=READ_SIZE)
        return cls(reader, writer, exchange)

    async def send(self, request: bytes, start_ns: int) -> Exchange:
        exchange = self.exchange
        exchange.reset(start_ns)
        self.busy_since = start_ns
        self.writer.write(request)
        while not exchange.done:
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self.parser.feed_data(data)
        exchange.status = self.parser.get_status_code()
        self.busy_since = 0
        return exchange

    def close(self) -> None:
        self.writer.transport.abort()


def judge(exchange: Exchange, expect_events: int | None, expected_body: bytes | None) -> str | None:
    """What is wrong with a complete answer, or None."""
    if exchange.status != 200:
        return f"HTTP {exchange.status}"
    if expect_events is not None:
        if exchange.error_events:
            return "error event in the stream"
        if exchange.events != expect_events:
            return f"{exchange.events} events instead of {expect_events}"
    elif expected_body is not None and exchange.body() != expected_body:
        return "unexpected body"
    return None


def record(tally: Tally, exchange: Exchange, expect_events: int | None, end: int) -> None:
    tally.statuses[exchange.status] += 1
    problem = judge(exchange, expect_events, tally.expected_body)
    if end >= tally.t0 and expect_events is not None:
        tally.streams_checked += 1
        tally.streams_exact += problem is None
    if problem is not None:
        tally.error(problem, end)
    elif tally.t0 <= end < tally.t1:
        tally.ok += 1
        tally.latencies.append(end - exchange.start_ns)
        if expect_events:
            tally.first_events.append(exchange.first_event_ns - exchange.start_ns)
            tally.stream_events += exchange.events
            tally.stream_chunks += max(1, exchange.chunks - 1)  # less the terminating empty chunk


class Client:
    """One simulated user: sends the phase's request again and again on its connection until the window ends."""

    def __init__(self, phase: Phase, request: bytes, tally: Tally, port: int | None = None) -> None:
        self.phase = phase
        self.request = request
        self.tally = tally
        self.port = port or phase.port
        self.conn: Connection | None = None

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def run(self) -> None:
        import httptools

        while time.perf_counter_ns() < self.tally.t1:
            start = time.perf_counter_ns()
            try:
                if self.conn is None:
                    self.tally.connections += 1
                    self.conn = await Connection.open(
                        self.port, Exchange(self.tally, self.phase.expect_events is not None)
                    )
                exchange = await self.conn.send(self.request, start)
            except (OSError, httptools.HttpParserError) as exc:
                timed_out = self.conn is not None and self.conn.timed_out
                self.tally.error(
                    "no answer in time" if timed_out else f"{type(exc).__name__}: {exc}", time.perf_counter_ns()
                )
                self.drop()
                await asyncio.sleep(0.05)
                continue
            record(self.tally, exchange, self.phase.expect_events, time.perf_counter_ns())
            if not exchange.keep_alive:
                self.drop()
        self.drop()


async def watchdog(clients: list[Client], timeout_s: float) -> None:
    """Abort connections whose answer takes longer than ``timeout_s`` (a hang is an error, not a stall)."""
    limit = int(timeout_s * 1e9)
    while True:
        await asyncio.sleep(0.5)
        now = time.perf_counter_ns()
        for client in clients:
            conn = client.conn
            if conn is not None and conn.busy_since and now - conn.busy_since > limit:
                conn.timed_out = True
                conn.close()


async def sample_cpu(tally: Tally, groups: dict[str, list[int]]) -> dict[str, float]:
    await asyncio.sleep(max(0.0, (tally.t0 - time.perf_counter_ns()) / 1e9))
    before = cpu_snapshot(groups)
    await asyncio.sleep(max(0.0, (tally.t1 - time.perf_counter_ns()) / 1e9))
    return cpu_usage(before, cpu_snapshot(groups))


async def probe(phase: Phase, timeout_s: float) -> tuple[int, bytes, int]:
    """One request before the load: (status, body, events); status 0 and the error if there was no answer."""
    import httptools

    tally = Tally(t1=1)
    try:
        conn = await Connection.open(phase.port, Exchange(tally, sse=False))
    except OSError as exc:
        return 0, repr(exc).encode(), 0
    try:
        exchange = await asyncio.wait_for(conn.send(phase.request(), time.perf_counter_ns()), timeout_s)
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        return 0, repr(exc).encode(), 0
    finally:
        conn.close()
    body = exchange.body()
    events = sum(1 for block in body.split(b"\n\n") if block.startswith(b"data:"))
    return exchange.status, body, events


@dataclass
class Settings:
    warmup_s: float
    duration_s: float
    request_timeout_s: float


async def run_phase(phase: Phase, settings: Settings) -> dict[str, Any]:
    """Warm up, measure, drain; return the phase's figures."""
    log(f"{phase.label}: warm-up {settings.warmup_s:g} s, then {settings.duration_s:g} s")
    status, body, events = await probe(phase, settings.request_timeout_s)
    tally = Tally()
    if phase.expect_events is None and status == 200 and phase.same_body:
        tally.expected_body = body  # later answers must be the same
    start = time.perf_counter_ns()
    tally.t0 = start + int(settings.warmup_s * 1e9)
    tally.t1 = tally.t0 + int(settings.duration_s * 1e9)
    ports = phase.client_ports()
    requests = {port: phase.request(port) for port in set(ports)}
    clients = [Client(phase, requests[port], tally, port) for port in ports]
    sampler = asyncio.create_task(sample_cpu(tally, phase.cpu_groups))
    guard = asyncio.create_task(watchdog(clients, settings.request_timeout_s))
    try:
        await asyncio.gather(*(client.run() for client in clients))
        cpu = await sampler
    finally:
        guard.cancel()
        sampler.cancel()
        for client in clients:
            client.drop()
    result = summarize(phase, tally, settings.duration_s, cpu)
    result["probe"] = {"status": status, "body": body[:200].decode(errors="replace"), "events": events}
    log(f"{phase.label}: {json.dumps({k: v for k, v in result.items() if k not in ('cpu', 'probe')})}")
    return result


def percentile_ms(values: list[int], pct: float) -> float | None:
    """Nearest-rank percentile of nanosecond values, in ms."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)] / 1e6


def summarize(phase: Phase, tally: Tally, duration_s: float, cpu: dict[str, float]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "target": phase.key,
        "path": phase.path,
        "concurrency": phase.concurrency,
        "ok": tally.ok,
        "requests_per_s": tally.ok / duration_s,
        "p50_ms": percentile_ms(tally.latencies, 50),
        "p99_ms": percentile_ms(tally.latencies, 99),
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "warmup_errors": dict(tally.warmup_errors),
        "statuses": {str(code): count for code, count in tally.statuses.items()},
        "connections": tally.connections,
        "cpu": cpu,
    }
    if phase.expect_events is not None:
        result |= {
            "expected_events": phase.expect_events,
            "tokens_per_s": tally.window_events / duration_s,
            "streams_checked": tally.streams_checked,
            "streams_exact": tally.streams_exact,
            "first_event_p50_ms": percentile_ms(tally.first_events, 50),
            "first_event_p99_ms": percentile_ms(tally.first_events, 99),
            "events_per_chunk": tally.stream_events / tally.stream_chunks if tally.stream_chunks else None,
        }
    return result


# ---- the report --------------------------------------------------------------------------------------------------


def run_lines(meta: dict[str, Any]) -> list[str]:
    """The command, date and machine of a run (``meta`` with ``machine_info()`` as ``machine``), as report lines."""
    machine = meta["machine"]
    return [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, Linux "
        f"{machine['kernel']}; load average before {machine['loadavg']}, after {meta['loadavg_after']}",
    ]


def run_meta(**fields: Any) -> dict[str, Any]:
    """The command, date and machine of a run (what :func:`run_lines` shows), and the bench's own ``fields``."""
    return {
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        **fields,
    }


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
    }


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _streams(result: dict[str, Any]) -> str:
    return f"{result['streams_exact']:,}/{result['streams_checked']:,}"


def table(results: dict[str, dict[str, Any]], ratio: float) -> list[str]:
    lift, peer = results["liftoff_generate"], results["minimal_generate"]
    slift, speer = results["liftoff_stream"], results["minimal_stream"]
    conc, sconc, tokens = lift["concurrency"], slift["concurrency"], slift["expected_events"]
    exact = slift["streams_checked"] > 0 and slift["streams_exact"] == slift["streams_checked"]
    return [
        "| Measure | Liftoff | Peer (minimal uvicorn + Starlette) | Target | Result |",
        "|---|--:|--:|---|---|",
        f"| `POST /generate` ({SHORT_TOKENS} tokens), {conc} clients: requests/s | {_num(lift['requests_per_s'])} "
        f"| {_num(peer['requests_per_s'])} | ≥ {TARGET_RATIO:g} x peer | {_mark(ratio >= TARGET_RATIO)} |",
        f"| Liftoff / peer requests/s | {ratio:.2f} | 1 | ≥ {TARGET_RATIO:.2f} | {_mark(ratio >= TARGET_RATIO)} |",
        f"| p50 latency (ms) | {_num(lift['p50_ms'], 2)} | {_num(peer['p50_ms'], 2)} | — | — |",
        f"| p99 latency (ms) | {_num(lift['p99_ms'], 2)} | {_num(peer['p99_ms'], 2)} | — | — |",
        f"| errors | {lift['errors']} | {peer['errors']} | 0 | {_mark(lift['errors'] == 0)} |",
        f"| `POST /generate_stream`, {sconc} streams x {tokens} tokens: tokens/s | {_num(slift['tokens_per_s'])} "
        f"| {_num(speer['tokens_per_s'])} | ≥ {TARGET_TOKENS_PER_S:,} | "
        f"{_mark(slift['tokens_per_s'] >= TARGET_TOKENS_PER_S)} |",
        f"| streams with exactly {tokens} events | {_streams(slift)} | {_streams(speer)} | all | {_mark(exact)} |",
        f"| stream p50 / p99 (ms) | {_num(slift['p50_ms'], 1)} / {_num(slift['p99_ms'], 1)} "
        f"| {_num(speer['p50_ms'], 1)} / {_num(speer['p99_ms'], 1)} | — | — |",
        f"| first event p50 / p99 (ms) | {_num(slift['first_event_p50_ms'], 1)} / "
        f"{_num(slift['first_event_p99_ms'], 1)} | {_num(speer['first_event_p50_ms'], 1)} / "
        f"{_num(speer['first_event_p99_ms'], 1)} | — | — |",
        f"| events per HTTP chunk (mean) | {_num(slift['events_per_chunk'], 1)} "
        f"| {_num(speer['events_per_chunk'], 1)} | — | — |",
        f"| stream errors | {slift['errors']} | {speer['errors']} | 0 | {_mark(slift['errors'] == 0)} |",
    ]


CPU_COLUMNS = (("client", "load generator"), ("gateway", "Liftoff gateway"), ("readers", "Liftoff readers"),
               ("minimal", "minimal app"), ("other", "other processes"))  # fmt: skip


def cpu_table(results: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...] = CPU_COLUMNS) -> list[str]:
    """One row per phase, one column per process group (``columns``: key in the phase's ``cpu``, heading)."""
    rows = [
        "| Phase | " + " | ".join(heading for _, heading in columns) + " |",
        "|---|" + "--:|" * len(columns),
    ]
    for key, result in results.items():
        cpu = result["cpu"]
        cells = [cpu.get(name) for name, _ in columns]
        rows.append(f"| {key} | " + " | ".join("—" if c is None else f"{c:.0f} %" for c in cells) + " |")
    return rows


def paced_rows(results: dict[str, dict[str, Any]], delay_ms: float) -> list[str]:
    """The optional paced stream phase: no peer, no target; a measure of the per-chunk relay cost."""
    paced = results.get("liftoff_paced_stream")
    if paced is None:
        return []
    good = paced["streams_checked"] > 0 and paced["streams_exact"] == paced["streams_checked"] and not paced["errors"]
    label = f"paced `POST /generate_stream` (token_delay_ms {delay_ms:g}), {paced['concurrency']} streams"
    return [
        f"| {label}: tokens/s | {_num(paced['tokens_per_s'])} | — | — | — |",
        f"| {label}: events per HTTP chunk | {_num(paced['events_per_chunk'], 1)} | — | — | — |",
        f"| {label}: exact streams, errors | {_streams(paced)}, {paced['errors']} | — | all, 0 | {_mark(good)} |",
    ]


def report(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> tuple[list[str], float]:
    peer = results["minimal_generate"]["requests_per_s"]
    ratio = results["liftoff_generate"]["requests_per_s"] / peer if peer else 0.0
    delay = meta["paced_token_delay_ms"]
    paced = f", and a reader with token_delay_ms {delay:g} (group '{PACED_GROUP}')" if delay > 0 else ""
    lines = [
        *table(results, ratio),
        *paced_rows(results, meta["paced_token_delay_ms"]),
        "",
        "CPU use during each measurement window (100 % = one core):",
        "",
        *cpu_table(results),
        "",
        *run_lines(meta),
        f"- Liftoff: {meta['readers']} echo reader(s), max_batch_size {meta['batch_size']}, token_delay_ms 0"
        f"{paced}; "
        f"stopped with exit code {meta['liftoff_exit']} in {meta['liftoff_stop_s']:.1f} s; "
        f"{len(meta['liftoff_log_problems'])} warning/error log lines",
    ]
    return lines + error_lines(results), ratio


def error_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The kinds of errors of each phase, during the warm-up and in the measurement window."""
    return [
        f"- {key} {name.replace('_', ' ')}: {result[name]}"
        for name in ("warmup_errors", "error_kinds")
        for key, result in results.items()
        if result[name]
    ]


# ---- main --------------------------------------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def phases(args: argparse.Namespace, liftoff: Managed, lift_port: int, minimal: Managed, peer_port: int) -> list[Phase]:
    short = {"text": PROMPT, "max_new_tokens": SHORT_TOKENS, "min_new_tokens": SHORT_TOKENS}
    long = {"text": PROMPT, "max_new_tokens": args.stream_tokens, "min_new_tokens": args.stream_tokens}
    lift_cpu = {"client": [os.getpid()], "gateway": [liftoff.pid], "readers": liftoff.track_children()}
    peer_cpu = {"client": [os.getpid()], "minimal": [minimal.pid]}
    plan = [
        Phase("liftoff_generate", "Liftoff /generate", lift_port, "/generate", short, args.concurrency, None, lift_cpu),
        Phase("minimal_generate", "minimal /generate", peer_port, "/generate", short, args.concurrency, None, peer_cpu),
        Phase("liftoff_stream", "Liftoff /generate_stream", lift_port, "/generate_stream", long,
              args.stream_concurrency, args.stream_tokens, lift_cpu),
        Phase("minimal_stream", "minimal /generate_stream", peer_port, "/generate_stream", long,
              args.stream_concurrency, args.stream_tokens, peer_cpu),
    ]  # fmt: skip
    if args.paced_token_delay_ms > 0:
        paced = {**long, "consumer_group": PACED_GROUP}
        plan.append(Phase("liftoff_paced_stream", "Liftoff paced /generate_stream", lift_port, "/generate_stream",
                          paced, args.paced_concurrency, args.stream_tokens, lift_cpu))  # fmt: skip
    if args.api_key:
        plan = [dataclasses.replace(phase, api_key=args.api_key) for phase in plan]
    return plan


async def run_all(plan: list[Phase], settings: Settings) -> dict[str, dict[str, Any]]:
    return {phase.key: await run_phase(phase, settings) for phase in plan}


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the script like Ctrl-C does, so that the servers are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, run the phases, stop the servers; return results and metadata."""
    meta = run_meta(readers=args.readers, batch_size=args.batch_size, paced_token_delay_ms=args.paced_token_delay_ms,
                    api_keys=bool(args.api_key))  # fmt: skip
    settings = Settings(args.warmup, args.duration, args.request_timeout)
    with tempfile.TemporaryDirectory(prefix="liftoff-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        liftoff, lift_port = start_liftoff(workdir, args, stack)
        minimal, peer_port = start_minimal(workdir, stack)
        results = run_async(run_all(phases(args, liftoff, lift_port["port"], minimal, peer_port), settings))
        stack.close()  # stop both now, to report how Liftoff stopped
        meta |= {
            "liftoff_exit": liftoff.exit_code,
            "liftoff_stop_s": liftoff.stop_s,
            "liftoff_leftover_pids": liftoff.leftovers,
            "liftoff_log_problems": liftoff.log_problems(),
        }
    meta["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    return {"meta": meta, "results": results}


def peer_report(outcome: dict[str, Any]) -> list[str]:
    """The report of the default mode (Liftoff against the minimal peer); adds ``ratio`` to ``outcome``."""
    lines, outcome["ratio"] = report(outcome["results"], outcome["meta"])
    return lines + [f"  liftoff log: {line}" for line in outcome["meta"]["liftoff_log_problems"][:10]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds measured per phase (default 10).")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of warm-up per phase (default 2).")
    parser.add_argument("--concurrency", type=int, default=64, help="Clients of the /generate phases (64).")
    parser.add_argument("--stream-concurrency", type=int, default=16, help="Clients of the stream phases (16).")
    parser.add_argument("--stream-tokens", type=int, default=256, help="Tokens (events) per stream (256).")
    parser.add_argument("--readers", type=int, default=1, help="Echo readers of the Liftoff gateway (1).")
    parser.add_argument("--batch-size", type=int, default=128, help="max_batch_size of each reader (128).")
    parser.add_argument(
        "--paced-token-delay-ms",
        type=float,
        default=0.0,
        help="Also stream from a reader that sleeps this long per token (one event per chunk); 0: skip (default).",
    )
    parser.add_argument("--paced-concurrency", type=int, default=64, help="Clients of the paced stream phase (64).")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="An answer later than this is an error.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument(
        "--api-key",
        default="",
        help="Give the Liftoff gateway this api_keys entry and send it with every request (to the peer too): the "
        "cost of checking a key. Default: no keys.",
    )
    parser.add_argument(
        "--broker",
        choices=("embedded", "redis"),
        default="embedded",
        help="embedded (default): Liftoff against the minimal peer; redis: embedded vs Redis broker vs two "
        "gateways on one Redis (starts its own redis-server; see above).",
    )
    parser.add_argument(
        "--latency-concurrency",
        type=int,
        default=1,
        help="--broker redis: clients of the latency phases, embedded vs Redis (default 1: sequential requests).",
    )
    parser.add_argument(
        "--reader-message-timeout-ms",
        type=int,
        help="--broker redis: server_config reader_message_timeout_ms of every gateway (default: Liftoff's).",
    )
    parser.add_argument("--keep-logs", type=Path, help="--broker redis: copy the servers' logs into this folder.")
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.broker == "redis" and args.paced_token_delay_ms > 0:
        parser.error("--paced-token-delay-ms is for --broker embedded (no stream phases with --broker redis)")
    if args.broker == "redis" and min(args.latency_concurrency, args.concurrency, args.readers) < 1:
        parser.error("--concurrency, --latency-concurrency and --readers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.minimal_server is not None:
        serve_minimal(args.minimal_server)
        return 0
    run, render = benchmark, peer_report
    if args.broker == "redis":
        sys.modules.setdefault("gateway", sys.modules[__name__])  # gateway_redis imports this module, not a copy
        from gateway_redis import benchmark_redis, report_redis

        run, render = benchmark_redis, report_redis
    with terminate_on_sigterm():
        try:
            outcome = run(args)
        except RuntimeError as exc:
            log(f"failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted; the servers were stopped")
            return 130
    print("\n".join(render(outcome)))
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 1 if outcome["meta"].get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
