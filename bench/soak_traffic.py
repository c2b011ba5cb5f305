"""The soak's traffic (``bench/soak.py``): each request kind, how its answer is judged, and the closed-loop clients.

Each request ends as one of three outcomes: ``ok`` (a good answer), ``expected`` (a bad request answered with
the 4xx it deserves) or ``unexpected`` (a 5xx, a 4xx to a good request, another status to a bad one, no answer
within the request timeout, a broken connection, or a wrong answer). Only the last is a failure of the server.

Wrong answers: a JSON or SSE body of the wrong shape, a generation longer than asked, a stream without its end
(metadata event, ``[DONE]``), or an embedding that is not the one the same text got first (cosine below
``EMBED_MIN_COSINE``; batches of other sizes change the last bits, not the direction). Generated text is not
compared: with llama.cpp's prefix cache a prompt may be computed in another batch shape and take another greedy
token, so equal text is not a contract (docs/models.md); the count of answers that differ from the first is shown.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = (
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is the capital of France?",
    "Give me a short tip for learning to cook.",
    "Describe a cat in five words.",
    "Count from one to five.",
)
EMBED_TEXTS = ("The quick brown fox.", "Soak tests find leaks.", "A sunny day at the beach.", "Bread needs yeast.")
EMBED_MIN_COSINE = 0.999
STREAM_CANCEL_AFTER = 2  # events read before a cancelling client hangs up
HUGE = 18446744073709551621  # 2**64 + 5: no 64-bit field holds it (issue 14)


class WrongAnswerError(Exception):
    """An answer that is not the right one: ``what`` names the kind of problem (the report groups by it)."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(f"{what}: {detail}" if detail else what)
        self.what = what
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """Where the traffic goes: the ports and the names the server was started with."""

    native: str
    openai: str
    group: str  # the generation group (llama.cpp SmolLM2)
    embed_group: str
    llm_reader: str  # a reader id of ``group`` (for /tokenize)
    max_new_tokens: int


@dataclass
class Ledger:
    """What the clients saw, per kind."""

    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    unexpected: Counter[str] = field(default_factory=Counter)  # "kind: what" -> count
    samples: dict[str, str] = field(default_factory=dict)  # "kind: what" -> one example's detail
    differing: Counter[str] = field(default_factory=Counter)  # generations unlike the first for the same request
    firsts: dict[str, Any] = field(default_factory=dict)  # first answer per (kind, request)

    def add(self, kind: str, outcome: str, ms: float, what: str = "", detail: str = "") -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1
        if outcome == "unexpected":
            key = f"{kind}: {what}"
            self.unexpected[key] += 1
            self.samples.setdefault(key, " ".join(detail.split())[:300])
        else:
            self.latencies_ms.setdefault(kind, []).append(ms)

    def same_as_first(self, key: str, value: Any) -> bool:
        return bool(self.firsts.setdefault(key, value) == value)


Check = Callable[[httpx.AsyncClient, Target, random.Random, Ledger], Coroutine[Any, Any, str]]


def _json(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise WrongAnswerError(f"HTTP {response.status_code}", response.text)
    try:
        return response.json()
    except ValueError:
        raise WrongAnswerError("not JSON", response.text) from None


async def _refused(response: httpx.Response) -> None:
    """A stream that did not start: its status is the problem."""
    if response.status_code != 200:
        raise WrongAnswerError(f"HTTP {response.status_code}", (await response.aread()).decode(errors="replace"))


def _count(tokens: Any, limit: int, where: str) -> None:
    if not isinstance(tokens, int) or not 0 <= tokens <= limit:
        raise WrongAnswerError("wrong token count", f"{where}: {tokens!r} tokens, asked for at most {limit}")


async def generate(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    prompt = rng.choice(PROMPTS)
    body = {"text": prompt, "max_new_tokens": target.max_new_tokens, "return_metadata": True}
    answer = _json(await client.post(f"{target.native}/generate", json=body))
    if not isinstance(answer.get("text"), str) or not isinstance(answer.get("metadata"), dict):
        raise WrongAnswerError("no text and metadata", repr(answer))
    _count(answer["metadata"].get("completion_tokens"), target.max_new_tokens, "metadata")
    if not ledger.same_as_first(f"generate {prompt}", answer["text"]):
        ledger.differing["generate"] += 1
    return "ok"


async def _sse(response: httpx.Response, stop_after: int | None = None) -> list[tuple[str, str]]:
    """``(event, data)`` of a server-sent event stream; after ``stop_after`` data events, stop reading."""
    events: list[tuple[str, str]] = []
    name = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data:"):
            events.append((name, line[6:] if line.startswith("data: ") else line[5:]))
            if stop_after is not None and len(events) >= stop_after:
                break
        elif line == "":
            name = "message"
    return events


async def generate_stream(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    body = {"text": rng.choice(PROMPTS), "max_new_tokens": target.max_new_tokens, "return_metadata": True}
    async with client.stream("POST", f"{target.native}/generate_stream", json=body) as response:
        await _refused(response)
        events = await _sse(response)
    names = [name for name, _ in events]
    if "error" in names:
        raise WrongAnswerError("error event", events[names.index("error")][1])
    if not names or names[-1] != "metadata":
        raise WrongAnswerError("no metadata event at the end", f"{len(events)} events")
    _count(json.loads(events[-1][1]).get("completion_tokens"), target.max_new_tokens, "metadata")
    return "ok"


def _chat_body(target: Target, rng: random.Random, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    return {"model": target.group, "messages": messages, "max_tokens": target.max_new_tokens, "stream": stream}


async def chat(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    answer = _json(await client.post(f"{target.openai}/v1/chat/completions", json=_chat_body(target, rng, False)))
    try:
        content = answer["choices"][0]["message"]["content"]
        tokens = answer["usage"]["completion_tokens"]
    except (KeyError, IndexError, TypeError):
        raise WrongAnswerError("not a chat completion", repr(answer)) from None
    if not isinstance(content, str):
        raise WrongAnswerError("content not a string", repr(content))
    _count(tokens, target.max_new_tokens, "usage")
    return "ok"


async def chat_stream(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    url = f"{target.openai}/v1/chat/completions"
    async with client.stream("POST", url, json=_chat_body(target, rng, True)) as response:
        await _refused(response)
        data = [payload for _, payload in await _sse(response)]
    if not data or data[-1] != "[DONE]":
        raise WrongAnswerError("no [DONE] at the end", f"{len(data)} events")
    chunks = [json.loads(payload) for payload in data[:-1]]
    if any("error" in chunk for chunk in chunks):
        raise WrongAnswerError("error chunk", data[-2])
    if not chunks or chunks[-1]["choices"][0].get("finish_reason") not in ("stop", "length"):
        raise WrongAnswerError("no finish_reason", data[-2] if len(data) > 1 else "")
    return "ok"


async def cancel(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    """A client that hangs up mid-stream (the reader must free the slot; the soak checks nothing is left)."""
    body = {"text": rng.choice(PROMPTS), "max_new_tokens": 256, "min_new_tokens": 64}
    async with client.stream("POST", f"{target.native}/generate_stream", json=body) as response:
        await _refused(response)
        events = await _sse(response, stop_after=STREAM_CANCEL_AFTER)
    if len(events) < STREAM_CANCEL_AFTER:
        raise WrongAnswerError("stream shorter than asked", f"{len(events)} events before the client left")
    return "ok"


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def _same_vector(ledger: Ledger, text: str, vector: Any) -> None:
    if not isinstance(vector, list) or not vector or not all(isinstance(x, float) for x in vector):
        raise WrongAnswerError("not a vector", repr(vector)[:200])
    first = ledger.firsts.setdefault(f"embed {text}", vector)
    if len(first) != len(vector) or _cosine(first, vector) < EMBED_MIN_COSINE:
        raise WrongAnswerError("another vector than the first for the same text", text)


async def embed(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    text = rng.choice(EMBED_TEXTS)
    body = {"text": text, "consumer_group": target.embed_group}
    _same_vector(ledger, text, _json(await client.post(f"{target.native}/embed", json=body)).get("result"))
    return "ok"


async def openai_embed(client: httpx.AsyncClient, target: Target, rng: random.Random, ledger: Ledger) -> str:
    texts = rng.sample(EMBED_TEXTS, 2)
    body = {"model": target.embed_group, "input": texts, "encoding_format": "float"}
    answer = _json(await client.post(f"{target.openai}/v1/embeddings", json=body))
    try:
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
    except (KeyError, TypeError):
        raise WrongAnswerError("not an embedding list", repr(answer)) from None
    if len(vectors) != len(texts):
        raise WrongAnswerError("wrong number of embeddings", f"{len(vectors)} for {len(texts)} inputs")
    for text, vector in zip(texts, vectors, strict=True):
        _same_vector(ledger, text, vector)
    return "ok"


# ---- bad requests ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A request the server must refuse with one of ``statuses`` (never a 5xx, a hang or a dead reader)."""

    name: str
    surface: str  # "native" or "openai"
    path: str
    body: Any  # a JSON value, or bytes sent as they are
    statuses: frozenset[int]


def bad_requests(target: Target) -> list[Bad]:
    """The bad requests, sent in turn: malformed, out of range, unknown names, over the limits (issue 14).

    400 and 422 both count where docs/api.md allows either (range checks are 422 today, 400 after issue 14)."""
    hi, chat = {"text": "hi"}, {"model": target.group, "messages": [{"role": "user", "content": "hi"}]}
    invalid = frozenset({400, 422})
    return [
        Bad("malformed JSON", "native", "/generate", b'{"text": "hi"', frozenset({400})),
        Bad("max_new_tokens 0", "native", "/generate", {**hi, "max_new_tokens": 0}, invalid),
        Bad("max_new_tokens 2**64+5", "native", "/generate", {**hi, "max_new_tokens": HUGE}, invalid),
        Bad("sampling_topk 2**64+5", "native", "/generate_stream", {**hi, "sampling_topk": HUGE}, invalid),
        Bad("negative sampling_temperature", "native", "/generate", {**hi, "sampling_temperature": -1}, invalid),
        Bad("sampling_topp 1.5", "native", "/generate", {**hi, "sampling_topp": 1.5}, invalid),
        Bad("unknown consumer_group", "native", "/generate", {**hi, "consumer_group": "no-such-group"},
            frozenset({404})),
        Bad("empty text list", "native", "/generate", {"text": []}, invalid),
        Bad("prompt over max_prompt_string_bytes", "native", "/generate", {"text": "a" * 150_001}, invalid),
        Bad("/embed to the chat model", "native", "/embed", {**hi, "consumer_group": target.group}, invalid),
        Bad("/tokenize of 1.8 MB", "native", f"/tokenize/{target.llm_reader}", {"text": "a " * 900_000},
            frozenset({400, 413})),
        Bad("chat without messages", "openai", "/v1/chat/completions", {"model": target.group}, invalid),
        Bad("chat max_tokens 2**64+5", "openai", "/v1/chat/completions", {**chat, "max_tokens": HUGE}, invalid),
        # OpenAI allows any integer seed: a negative one may be honoured or refused, never a 5xx.
        Bad("chat negative seed", "openai", "/v1/chat/completions", {**chat, "max_tokens": 4, "seed": -1},
            frozenset({200, 400, 422})),
        Bad("embeddings of an unknown model", "openai", "/v1/embeddings", {"model": "no-such-group", "input": "x"},
            frozenset({404})),
    ]  # fmt: skip


async def send_bad(client: httpx.AsyncClient, target: Target, bad: Bad) -> str:
    url = (target.native if bad.surface == "native" else target.openai) + bad.path
    if isinstance(bad.body, bytes):
        response = await client.post(url, content=bad.body, headers={"content-type": "application/json"})
    else:
        response = await client.post(url, json=bad.body)
    if response.status_code not in bad.statuses:
        raise WrongAnswerError(f"answered {response.status_code}", response.text)
    return "expected" if response.status_code >= 400 else "ok"


# ---- the clients -------------------------------------------------------------------------------------------------

KINDS: dict[str, Check] = {"generate": generate, "generate_stream": generate_stream, "chat": chat,
                           "chat_stream": chat_stream, "embed": embed, "openai_embed": openai_embed,
                           "cancel": cancel}  # fmt: skip
DEFAULT_MIX = {"generate": 20, "generate_stream": 15, "chat": 10, "chat_stream": 10, "embed": 15,
               "openai_embed": 10, "cancel": 5, "bad": 15}  # fmt: skip


def weighted_cycle(mix: dict[str, int]) -> list[str]:
    """One cycle of the kinds, each ``weight`` times, spread evenly (smooth weighted round robin): every kind
    comes early, and any stretch of requests holds the mix's proportions, short runs too."""
    current = dict.fromkeys(mix, 0)
    order = []
    for _ in range(sum(mix.values())):
        for kind, weight in mix.items():
            current[kind] += weight
        chosen = max(current, key=lambda kind: current[kind])
        current[chosen] -= sum(mix.values())
        order.append(chosen)
    return order


@dataclass
class Plan:
    """The fixed mix (its kinds in a fixed cycle that all clients share), the bad requests taken in turn, the
    per-request deadline."""

    target: Target
    mix: dict[str, int]
    bad: list[Bad]
    request_timeout_s: float
    sent: int = 0
    sent_bad: int = 0
    cycle: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cycle = weighted_cycle(self.mix)

    def next_kind(self) -> str:
        self.sent += 1
        return self.cycle[(self.sent - 1) % len(self.cycle)]

    def next_bad(self) -> Bad:
        self.sent_bad += 1
        return self.bad[(self.sent_bad - 1) % len(self.bad)]


async def one_request(client: httpx.AsyncClient, plan: Plan, kind: str, rng: random.Random, ledger: Ledger) -> None:
    """Send one request of ``kind``, judge it, record it (a hang is ``unexpected``, not a stall)."""
    name = kind
    if kind == "bad":
        bad = plan.next_bad()
        name, request = f"bad: {bad.name}", send_bad(client, plan.target, bad)
    else:
        request = KINDS[kind](client, plan.target, rng, ledger)
    started = time.perf_counter()
    what = detail = ""
    try:
        outcome = await asyncio.wait_for(request, plan.request_timeout_s)
    except TimeoutError:
        outcome, what = "unexpected", f"no answer within {plan.request_timeout_s:g} s"
    except WrongAnswerError as exc:
        outcome, what, detail = "unexpected", exc.what, exc.detail
    except httpx.HTTPError as exc:
        outcome, what, detail = "unexpected", f"connection: {type(exc).__name__}", str(exc)
    ledger.add(name, outcome, (time.perf_counter() - started) * 1000, what, detail)


async def client_loop(plan: Plan, index: int, seed: int, deadline: float, ledger: Ledger) -> None:
    """One closed-loop client: the mix's next request, again and again until ``deadline`` (``rng`` picks prompts)."""
    rng = random.Random(seed * 1000 + index)
    async with httpx.AsyncClient(timeout=httpx.Timeout(plan.request_timeout_s + 5)) as client:
        while time.monotonic() < deadline:
            await one_request(client, plan, plan.next_kind(), rng, ledger)


async def run_traffic(plan: Plan, concurrency: int, duration_s: float, seed: int, ledger: Ledger) -> float:
    """``concurrency`` clients for ``duration_s`` (the requests then running finish); the seconds it took."""
    started = time.monotonic()
    deadline = started + duration_s
    await asyncio.gather(*(client_loop(plan, index, seed, deadline, ledger) for index in range(concurrency)))
    return time.monotonic() - started
