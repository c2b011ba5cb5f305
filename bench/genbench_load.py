"""The load generator of ``bench/generation.py``: prompts, streaming clients, per-token timing, figures.

Closed loop: each client keeps one keep-alive HTTP/1.1 connection and sends its next streaming request as soon as
the previous one ends. Every token event is timestamped when it arrives, so that the figures can be computed after
the run: aggregate output tokens/s over the measured window, TTFT (request written → first token event) and
inter-token latency (gaps between consecutive token events of one stream) of the requests that ended in it.

Three wire formats are understood: Liftoff's native SSE (one ``data:`` event per token piece, a final
``event: metadata`` with ``completion_tokens``, ``event: error``) and OpenAI chat-completion chunks (llama-server:
``usage`` in a chunk and ``data: [DONE]``; ``transformers serve``: ``usage`` in the last chunk, no ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
READ_SIZE = 256 * 1024
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TOPICS = [
    "the history of the printing press", "how honey bees make honey", "the water cycle", "volcanoes",
    "the Roman road network", "how a refrigerator works", "the life of a star", "tides and the moon",
    "the invention of the telephone", "how vaccines train the immune system", "coral reefs", "the Silk Road",
    "how airplanes stay in the air", "the origin of chess", "photosynthesis", "the Great Wall of China",
    "how a compiler works", "glaciers", "the first steam engines", "how bread rises", "the deep ocean",
    "the history of paper money", "how rainbows form", "migratory birds", "the Apollo moon landings",
    "earthquakes and plate tectonics", "the invention of the bicycle", "how batteries store energy",
    "ancient Egyptian pyramids", "the human heart", "how the internet routes packets", "desert ecosystems",
]  # fmt: skip
FILLER = [
    "Explain it to a curious student in plain words.",
    "Give two concrete examples.",
    "Mention one common misconception and why it is wrong.",
    "Describe what changed over time.",
    "Say what we still do not know.",
    "Keep the tone friendly and precise.",
    "Avoid jargon where a simple word will do.",
    "Use short paragraphs.",
    "Compare it with something from everyday life.",
    "Note where the idea first appeared.",
    "List the people who helped, and what each of them did.",
    "Finish with a one sentence summary that a child could remember.",
]


# ---- prompts -----------------------------------------------------------------------------------------------------


def chat_render(user: str) -> str:
    """The SmolLM2 chat template (ChatML with its default system prompt) applied to one user message."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip


def make_prompts(count: int, target_tokens: int, count_tokens: Callable[[str], int]) -> list[tuple[str, int]]:
    """``count`` distinct user messages whose chat-templated form is ``target_tokens`` tokens or just under
    (a topic, then instructions in an order that depends on the index, cut at a word); returns
    (message, templated token count) pairs."""
    prompts = []
    for index in range(count):
        shift = index // len(TOPICS) + index
        sentences = FILLER[shift % len(FILLER) :] + FILLER[: shift % len(FILLER)]
        words = f"Request {index}: write about {TOPICS[index % len(TOPICS)]}.".split()
        words += " ".join(sentences * 2).split()
        low, high = 1, len(words)  # the longest prefix of words that fits
        while low < high:
            middle = (low + high + 1) // 2
            if count_tokens(chat_render(" ".join(words[:middle]))) <= target_tokens:
                low = middle
            else:
                high = middle - 1
        text = " ".join(words[:low])
        prompts.append((text, count_tokens(chat_render(text))))
    return prompts


def _drop_log(level: int, text: bytes, user_data: int | None) -> None:
    """llama.cpp's log callback: drop its messages."""


_QUIET_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(_drop_log)


class PromptCycle:
    """The prompts in turn, shared by every client and phase of one server, so that no prompt is sent twice (a
    server with a prompt cache, like llama-server, would skip its prefill) until all have been used."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts
        self.sent = 0

    def next(self) -> str:
        prompt = self.prompts[self.sent % len(self.prompts)]
        self.sent += 1
        return prompt

    @property
    def repeats(self) -> int:
        """Requests that reused a prompt already sent."""
        return max(0, self.sent - len(self.prompts))


def token_counter(gguf: Path) -> Callable[[str], int]:
    """Count tokens with the GGUF's own tokenizer (llama.cpp, vocabulary only: fast, no weights)."""
    import llama_cpp

    llama_cpp.llama_log_set(_QUIET_LOG, None)
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=True))


# ---- wire formats ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """How to ask a server for one stream and how to read it."""

    kind: str  # "liftoff" or "openai"
    port: int
    path: str
    make_body: Callable[[str], dict[str, Any]]
    keep_alive: bool = True  # False: one connection per request ("Connection: close")

    def request(self, prompt: str) -> bytes:
        body = json.dumps(self.make_body(prompt), separators=(",", ":")).encode()
        close = "" if self.keep_alive else "Connection: close\r\n"
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n{close}Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body


@dataclass
class Stream:
    """One request as the client saw it."""

    start_ns: int
    end_ns: int = 0
    status: int = 0
    token_times: list[int] = field(default_factory=list)  # arrival of each token event (ns)
    completion_tokens: int | None = None  # as the server reports it (metadata / usage)
    prompt_tokens: int | None = None
    error: str | None = None
    done_marker: bool = False  # OpenAI "[DONE]"
    cut: bool = False  # still running when the window closed (aborted by the client)
    received: int = 0  # bytes of the answer

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count when it gave one, else the token events."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)


def _parse_block(block: bytes) -> tuple[str | None, str]:
    """An SSE block → (event name or None, data with its lines joined by newlines)."""
    event, data = None, []
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append((value[1:] if value.startswith(b" ") else value).decode(errors="replace"))
    return event, "\n".join(data)


def read_liftoff(stream: Stream, event: str | None, data: str, now: int) -> None:
    if event is None:
        stream.token_times.append(now)
    elif event == "metadata":
        meta = json.loads(data)
        stream.completion_tokens = meta.get("completion_tokens")
        stream.prompt_tokens = meta.get("prompt_tokens")
    elif event == "error":
        stream.error = f"error event: {data[:200]}"


def read_openai(stream: Stream, event: str | None, data: str, now: int) -> None:
    if data.strip() == "[DONE]":
        stream.done_marker = True
        return
    chunk = json.loads(data)
    if "error" in chunk:
        stream.error = f"error chunk: {str(chunk['error'])[:200]}"
        return
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            stream.token_times.append(now)
    usage = chunk.get("usage")
    if usage:
        stream.completion_tokens = usage.get("completion_tokens")
        stream.prompt_tokens = usage.get("prompt_tokens")


READERS: dict[str, Callable[[Stream, str | None, str, int], None]] = {"liftoff": read_liftoff, "openai": read_openai}


class Exchange:
    """One response being read (httptools parser callbacks)."""

    def __init__(self, kind: str) -> None:
        self.read_event = READERS[kind]
        self.parser: Any = None
        self.stream = Stream(0)
        self.done = False
        self.keep_alive = False
        self.tail = b""
        self.body = b""

    def reset(self, start_ns: int) -> None:
        self.stream = Stream(start_ns)
        self.done = False
        self.keep_alive = False
        self.tail = b""
        self.body = b""

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter_ns()
        if self.parser.get_status_code() != 200:
            self.body += body
            return
        blocks = (self.tail + body.replace(b"\r\n", b"\n")).split(b"\n\n")
        self.tail = blocks.pop()
        for block in blocks:
            event, data = _parse_block(block)
            if event is None and not data:
                continue  # a comment or keep-alive
            try:
                self.read_event(self.stream, event, data, now)
            except (ValueError, KeyError, TypeError) as exc:
                self.stream.error = f"unreadable event ({type(exc).__name__}): {block[:120]!r}"

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
        import httptools

        self.reader = reader
        self.writer = writer
        self.exchange = exchange
        self.parser = exchange.parser = httptools.HttpResponseParser(exchange)
        self.used = 0  # requests answered on this connection

    @classmethod
    async def open(cls, port: int, kind: str) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=READ_SIZE)
        return cls(reader, writer, Exchange(kind))

    async def send(self, request: bytes) -> Stream:
        exchange = self.exchange
        exchange.reset(time.perf_counter_ns())
        self.writer.write(request)
        while not exchange.done:
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            exchange.stream.received += len(data)
            self.parser.feed_data(data)
        self.used += 1
        stream = exchange.stream
        stream.status = self.parser.get_status_code()
        stream.end_ns = time.perf_counter_ns()
        if stream.status != 200:
            stream.error = f"HTTP {stream.status}: {exchange.body[:200].decode(errors='replace')}"
        return stream

    def close(self) -> None:
        self.writer.transport.abort()


# ---- one phase: a server at one concurrency ----------------------------------------------------------------------


@dataclass
class LoadSettings:
    concurrency: int
    warmup_s: float
    duration_s: float | None  # a measured window of this length...
    requests_per_client: int | None  # ... or this many requests per client after the warm-up
    timeout_s: float
    expect_tokens: int
    drain: bool = True  # let the streams running at the end of the window finish (False: abort them)


@dataclass
class Window:
    """The measured window; t0 is set once the warm-up is over (its time and every client's first request)."""

    started: int
    t0: int | None = None
    t1: int | None = None
    streams: list[Stream] = field(default_factory=list)
    warmed: set[int] = field(default_factory=set)
    finished: dict[int, int] = field(default_factory=dict)  # client -> end of its last measured request (ns)
    reconnects: int = 0
    on_t0: Callable[[], None] | None = None

    def open_if_warm(self, clients: int, settings: LoadSettings) -> None:
        now = time.perf_counter_ns()
        if self.t0 is None and len(self.warmed) >= clients and now - self.started >= settings.warmup_s * 1e9:
            self.t0 = now
            if settings.duration_s is not None:
                self.t1 = now + int(settings.duration_s * 1e9)
            if self.on_t0 is not None:
                self.on_t0()


async def request_once(api: Api, conn: Connection | None, request: bytes, timeout_s: float,
                       window: Window) -> tuple[Stream, Connection | None]:  # fmt: skip
    """Send one request; return its stream and the connection to reuse (None: open a new one next time).

    A server may close an idle keep-alive connection just as a request goes out on it (llama-server does so
    after every stream): when nothing came back on a reused connection, the request is sent again on a new one,
    as HTTP clients do, and that is not an error (``Window.reconnects`` counts it)."""
    import httptools

    for attempt in range(2):
        reused = conn is not None and conn.used > 0
        try:
            conn = conn or await Connection.open(api.port, api.kind)
            stream = await asyncio.wait_for(conn.send(request), timeout_s)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            stream = conn.exchange.stream if conn is not None else Stream(time.perf_counter_ns())
            if conn is not None:
                conn.close()
            conn = None
            if attempt == 0 and reused and isinstance(exc, ConnectionResetError) and not stream.received:
                window.reconnects += 1
                continue
            stream.end_ns = time.perf_counter_ns()
            stream.error = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.05)
            return stream, None
        if not conn.exchange.keep_alive:
            conn.close()
            conn = None
        return stream, conn
    raise AssertionError("unreachable")


async def client(index: int, api: Api, prompts: PromptCycle, window: Window, settings: LoadSettings) -> None:
    """One closed-loop user."""
    conn: Connection | None = None
    measured = 0
    try:
        while window.t1 is None or time.perf_counter_ns() < window.t1:
            if settings.requests_per_client is not None and measured >= settings.requests_per_client:
                break
            prompt = prompts.next()
            in_window = window.t0 is not None
            stream, conn = await request_once(api, conn, api.request(prompt), settings.timeout_s, window)
            window.streams.append(stream)
            measured += in_window
            if measured == settings.requests_per_client:
                window.finished[index] = stream.end_ns
            window.warmed.add(index)
            window.open_if_warm(settings.concurrency, settings)
    finally:
        if conn is not None:
            if not conn.exchange.done and conn.exchange.stream.start_ns:
                conn.exchange.stream.cut = True  # cut at the end of the window: its tokens still count
                window.streams.append(conn.exchange.stream)
            conn.close()


async def run_load(api: Api, prompts: PromptCycle, settings: LoadSettings, on_t0: Callable[[], None]) -> Window:
    """Run the closed loop. In ``--duration`` mode no request starts after the window; those still running then
    finish (``drain``, the default: a server is never cut off mid-stream) or are aborted at once."""
    window = Window(started=time.perf_counter_ns(), on_t0=on_t0)
    tasks = [asyncio.create_task(client(i, api, prompts, window, settings)) for i in range(settings.concurrency)]
    try:
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0.1)
            window.open_if_warm(settings.concurrency, settings)  # a warm-up that ended between requests
            if not settings.drain and window.t1 is not None and time.perf_counter_ns() >= window.t1:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if window.t1 is None:  # --requests-per-client: the window ends when the first client is done (full load
        # until then; with requests that run in lockstep waves, as at c=32, that is the end of a wave)
        window.t1 = min(window.finished.values(), default=time.perf_counter_ns())
    return window


# ---- figures -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def stream_problem(stream: Stream, expect: int) -> str | None:
    if stream.error:
        return stream.error
    if stream.tokens != expect:
        return f"{stream.tokens} tokens instead of {expect}"
    return None


def window_tokens(stream: Stream, t0: int, t1: int) -> float:
    """Tokens of ``stream`` that arrived in [t0, t1): each token event weighs tokens/events (Liftoff may merge
    several tokens into one piece)."""
    events = len(stream.token_times)
    if not events:
        return 0.0
    weight = stream.tokens / events if stream.completion_tokens else 1.0
    return weight * sum(1 for t in stream.token_times if t0 <= t < t1)


def summarize(window: Window, settings: LoadSettings) -> dict[str, Any]:
    """The figures of one phase: throughput over the window; latencies of the requests that ended in it."""
    t0, t1 = window.t0 or window.started, window.t1 or time.perf_counter_ns()
    seconds = max((t1 - t0) / 1e9, 1e-9)
    ended = [s for s in window.streams if t0 <= s.end_ns < t1 or (s.end_ns == t1 and settings.duration_s is None)]
    t1 += 1 if settings.duration_s is None else 0  # the last token of the closing request counts
    expect = settings.expect_tokens
    problems = Counter(p for s in ended if (p := stream_problem(s, expect)) is not None)
    good = [s for s in ended if stream_problem(s, expect) is None]
    ttft = [(s.token_times[0] - s.start_ns) / 1e6 for s in good if s.token_times]
    itl = [(b - a) / 1e6 for s in good for a, b in itertools.pairwise(s.token_times)]
    warm = [s for s in window.streams if s.end_ns < t0 and not s.cut]
    return {
        "concurrency": settings.concurrency,
        "window_s": seconds,
        "tokens_per_s": sum(window_tokens(s, t0, t1) for s in window.streams) / seconds,
        "requests": len(ended),
        "ok": len(good),
        "errors": sum(1 for s in ended if s.error),
        "exact": sum(1 for s in ended if not s.error and s.tokens == settings.expect_tokens),
        "problems": dict(problems.most_common(5)),
        "warmup_requests": len(warm),
        "warmup_problems": dict(Counter(p for s in warm if (p := stream_problem(s, expect))).most_common(3)),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
        "events_per_stream": sum(len(s.token_times) for s in good) / len(good) if good else None,
        "server_tokens_per_stream": _mean([s.completion_tokens for s in good if s.completion_tokens is not None]),
        "prompt_tokens": _mean([s.prompt_tokens for s in good if s.prompt_tokens is not None]),
        "done_marker": sum(1 for s in good if s.done_marker),
        "reconnects": window.reconnects,
    }  # fmt: skip


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None
