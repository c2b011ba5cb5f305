"""The load generator of the gateway benches: closed-loop clients on raw keep-alive HTTP/1.1 connections.

Why not an HTTP client library: at tens of thousands of requests per second on two cores, the client must cost
less than the server it measures. So each phase's request bytes are built once, answers are parsed by httptools
as they arrive (SSE events counted without decoding them), and everything runs on one uvloop event loop in the
bench's own process. Each phase warms up, then counts what ended in its measurement window; an answer that is
not a 200, differs from the first one, or hangs past the request timeout is an error, never a stall. The CPU
each process group used during the window is sampled alongside (``procs.cpu_snapshot``).

Used by bench/gateway.py, bench/gateway_redis.py, bench/gateway_keys.py and bench/embeddings.py (bench/generation.py
has its own, for token timing: bench/genbench_load.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.log import log
from common.ports import HOST
from common.procs import cpu_snapshot, cpu_usage

READ_SIZE = 256 * 1024
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a uvloop event loop (what ``liftoff serve`` runs on, and cheaper than asyncio's)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


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
    """Count one complete answer that ended at ``end``: an error (warm-up or window), or a good answer whose
    latency counts if it ended in the window."""
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
    """The CPU use of ``groups`` over exactly the measurement window (``procs.cpu_usage``)."""
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
    """The timing of every phase of a run (seconds)."""

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
    """The phase's figures, JSON-ready (the stream figures only for a stream phase)."""
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
