"""The API reader's HTTP side: one connection pool to the upstream, retries, streams, and the upstream's health.

Requests run on the reader's relay loop (asyncio, many at once). A request that the upstream refuses with 429 or
5xx, or that cannot reach it or times out, is tried again with exponential backoff (honouring ``Retry-After``) for
as long as ``api_timeout_s`` allows since it began, then fails with 503 (or 504 after a timeout) naming the
upstream. Once text has streamed nothing is retried: a broken stream ends the request with an error.

Health: a request that cannot connect marks the upstream down at once, and one whose connection breaks has it
probed at once; a background probe (``GET /models``, on a connection of its own) checks it every
``health_interval_s`` while it is up and every second while it is down, and marks it up when it answers.
The key goes in the ``Authorization`` header only; it is never logged and is cut out of any upstream message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from liftoff.backends.api.wire import RETRYABLE, client_error, error_message, retry_after_s
from liftoff.core.clock import monotonic
from liftoff.core.errors import LiftoffError, UpstreamError, UpstreamTimeoutError, UpstreamUnavailableError

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request: the gateway logs requests

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 2.0
DOWN_PROBE_S = 1.0
PROBE_TIMEOUT_S = 5.0


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def label_of(base: str) -> str:
    """The upstream as shown in messages and logs: scheme, host, port and path, without any user or password."""
    parts = urlsplit(base)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass
class UpstreamSettings:
    """Where the upstream is and how to talk to it."""

    base: str
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    connections: int = 32
    health_interval_s: float = 10.0

    def request_headers(self) -> dict[str, str]:
        """The extra headers, plus the key as a bearer token."""
        headers = dict(self.headers)
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    @property
    def root(self) -> str:
        """The server's root (``/tokenize`` and friends live there, not under ``/v1``)."""
        return self.base.removesuffix("/v1")


@dataclass
class _Failure:
    """An attempt that may be tried again."""

    error: LiftoffError
    retry_after: float = 0.0
    stale: bool = False  # the connection closed before any answer: a kept-alive one the server had dropped?


class Upstream:
    """The connection to one OpenAI-compatible server, used from the relay loop (and, for probes, any thread)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.label = label_of(settings.base)
        self.unhealthy = ""  # why the upstream is down; "" while it answers
        self.on_up: Callable[[Any], None] | None = None  # given each successful probe's GET /models answer
        self.fresh_connections = False  # a new connection per request (servers that drop kept-alive ones)
        self._client: httpx.AsyncClient | None = None
        self._wake: asyncio.Event | None = None
        self._secrets = (settings.key or "", *settings.headers.values())
        self._tls = httpx.create_ssl_context()  # made once: each client would load the CA bundle again (60 ms)

    # ---- lifecycle (relay loop) ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the connection pool (on the loop that will use it)."""
        limits = httpx.Limits(max_connections=self.settings.connections + 4,
                              max_keepalive_connections=self.settings.connections)  # fmt: skip
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.timeout_s), limits=limits,
                                         headers=self.settings.request_headers(), verify=self._tls)  # fmt: skip
        self._wake = asyncio.Event()

    async def close(self) -> None:
        """Close the pool (open streams are closed with it)."""
        if self._client is not None:
            await self._client.aclose()

    # ---- health -------------------------------------------------------------------------------------------------

    def mark_down(self, reason: str) -> None:
        """The upstream cannot be reached: report it, and probe it every second until it answers."""
        reason = self.redact(reason)
        if not self.unhealthy:
            logger.warning("upstream %s is down: %s", self.label, reason)
        self.unhealthy = reason
        if self._wake is not None:
            self._wake.set()

    def suspect(self) -> None:
        """A connection broke: probe the upstream now (a fresh connection tells whether it is really down)."""
        if self._wake is not None:
            self._wake.set()

    def mark_up(self) -> None:
        """The upstream answered."""
        if self.unhealthy:
            logger.info("upstream %s is back", self.label)
        self.unhealthy = ""

    def probe_sync(self) -> Any:
        """``GET /models`` from any thread; returns its JSON; raises :class:`LiftoffError` (load time)."""
        with self.sync_client(PROBE_TIMEOUT_S) as client:
            try:
                response = client.get(self.settings.base + "/models")
            except httpx.HTTPError as exc:
                raise UpstreamUnavailableError(f"{self.label} cannot be reached: {self.redact(str(exc))}") from None
            return self._probe_answer(response.status_code, response.content)

    async def watch(self) -> None:
        """Probe the upstream forever (a task of the relay loop)."""
        wake = self._wake
        assert wake is not None, "Upstream.open() was not called"
        while True:
            interval = DOWN_PROBE_S if self.unhealthy else self.settings.health_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)
            wake.clear()
            await self._probe()

    async def _probe(self) -> None:
        """One ``GET /models`` on a connection of its own (a pooled one may be stale, which says nothing)."""
        try:
            async with self.probe_client() as client:
                response = await client.get(self.settings.base + "/models")
            answer = self._probe_answer(response.status_code, response.content)
        except httpx.HTTPError as exc:
            self.mark_down(f"{type(exc).__name__}: {exc}")
        except LiftoffError as exc:
            self.mark_down(exc.message)
        else:
            self.mark_up()
            if self.on_up is not None:
                self.on_up(answer)

    def _probe_answer(self, status: int, content: bytes) -> Any:
        if status in (404, 405):  # a server without a model list: it answered, so it is up
            return {}
        if status >= 400:
            message = self.redact(error_message(content))
            if status in (401, 403):
                raise UpstreamError(f"{self.label} refused this reader's key ({status}): {message}")
            raise UpstreamUnavailableError(f"{self.label} answered GET /models with {status}: {message}")
        try:
            return httpx.Response(status, content=content).json()
        except ValueError:
            return {}

    def probe_client(self) -> httpx.AsyncClient:
        """A client of its own for one probe (a pooled connection may be stale, which says nothing)."""
        return httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, headers=self.settings.request_headers(), verify=self._tls)

    def sync_client(self, timeout: float) -> httpx.Client:
        """A client for one call from a service thread."""
        return httpx.Client(timeout=timeout, headers=self.settings.request_headers(), verify=self._tls)

    def redact(self, text: str) -> str:
        """``text`` without the key or header values."""
        return redact(text, self._secrets)

    # ---- requests (relay loop) ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST ``body`` and yield the ``data:`` payloads of the answer's event stream; closing it closes the
        upstream request (which is how a client's disconnect cancels the upstream's work)."""
        response = await self._send(path, body)
        try:
            yield self._events(response)
        finally:
            await response.aclose()

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` (with retries) and return the JSON answer."""
        response = await self._send(path, body)
        try:
            await response.aread()
        except httpx.HTTPError as exc:
            raise self._broken(exc) from None
        finally:
            await response.aclose()
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(f"{self.label} answered {path} with something that is not JSON") from None

    async def _events(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The ``data:`` payloads of an event stream, split from the bytes as they come (cheaper than
        ``aiter_lines``, which decodes text and splits it again: this runs once per token)."""
        pending = b""
        try:
            async for chunk in response.aiter_bytes():
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
            if pending.startswith(b"data:"):
                yield pending[5:].strip()
        except httpx.HTTPError as exc:
            raise self._broken(exc) from None

    def _broken(self, exc: httpx.HTTPError) -> LiftoffError:
        """The error for a response that broke off after it began."""
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeoutError(f"{self.label} went silent for {self.settings.timeout_s:g} s mid-response")
        self.suspect()
        return UpstreamUnavailableError(f"{self.label} broke off the response: {type(exc).__name__}")

    async def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """The upstream's accepted (status < 400) streaming response, after retries; raises the last failure."""
        started = monotonic()
        delay = FIRST_RETRY_S
        stale_retried = False
        while True:
            outcome = await self._attempt(path, body)
            if isinstance(outcome, httpx.Response):
                return outcome
            if outcome.stale and not stale_retried:  # a kept-alive connection the server had closed: again, now
                stale_retried = True
                continue
            left = self.settings.timeout_s - (monotonic() - started)
            wait = min(max(delay, outcome.retry_after), MAX_RETRY_S)
            if wait >= left:
                raise outcome.error
            logger.debug("retrying %s on %s in %.2f s: %s", path, self.label, wait, outcome.error.message)
            await asyncio.sleep(wait)
            delay *= 2

    async def _attempt(self, path: str, body: dict[str, Any]) -> httpx.Response | _Failure:
        assert self._client is not None, "Upstream.open() was not called"
        headers = {"Content-Type": "application/json"} | ({"Connection": "close"} if self.fresh_connections else {})
        content = msgspec.json.encode(body)
        request = self._client.build_request("POST", self.settings.base + path, content=content, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            self.mark_down(f"connecting timed out: {exc}")
            return _Failure(UpstreamTimeoutError(f"{self.label} did not accept a connection in time"))
        except httpx.TimeoutException:
            return _Failure(UpstreamTimeoutError(f"{self.label} did not answer within {self.settings.timeout_s:g} s"))
        except httpx.ConnectError as exc:
            self.mark_down(f"{type(exc).__name__}: {exc}")
            return _Failure(UpstreamUnavailableError(f"{self.label} cannot be reached ({type(exc).__name__})"))
        except httpx.TransportError as exc:  # the connection broke before an answer: maybe stale, maybe down
            self.suspect()
            error = UpstreamUnavailableError(f"{self.label} closed the connection ({type(exc).__name__})")
            return _Failure(error, stale=isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError))
        if response.status_code < 400:
            self.mark_up()
            return response
        return await self._refused(response)

    async def _refused(self, response: httpx.Response) -> _Failure:
        """A retryable failure for 429/5xx; raises the client's error for any other 4xx."""
        try:
            content = await response.aread()
        except httpx.HTTPError:
            content = b""
        finally:
            await response.aclose()
        status = response.status_code
        message = self.redact(error_message(content))
        if status in RETRYABLE:
            error = UpstreamUnavailableError(f"{self.label} answered {status}: {message}")
            return _Failure(error, retry_after_s(response.headers.get("retry-after")))
        raise client_error(status, message, self.label)
