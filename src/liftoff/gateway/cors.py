"""Cross-origin access for the web UI, and nothing else: the pages on the inference port call the management port
(readers, metrics), the OpenAI port (chat) and every port's ``/openapi.json``.

An origin is allowed when its port is one of this gateway's own ports and its host is the host the request was
sent to (the UI opened as ``localhost:3000`` calls ``localhost:3001``; ``127.0.0.1`` or a DNS name likewise).
Allowed origins get CORS headers (Starlette's :class:`CORSMiddleware`, methods GET, POST and DELETE, any header).
Any other origin gets none, so the browser keeps the answer from its page; and its requests that could change
something (every method but GET and HEAD) are refused with 403 before they reach a route, since browsers send
"simple" cross-origin POSTs (a ``text/plain`` body) without asking first. Requests without an ``Origin`` header
(every non-browser client) pass untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from liftoff.core.errors import ForbiddenError
from liftoff.gateway.asgi import header
from liftoff.gateway.errors import Renderer

ALLOWED_METHODS = ("GET", "POST", "DELETE")
SAFE_METHODS = frozenset({"GET", "HEAD"})
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[^/:\[\]@]+)"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_regex(ports: Iterable[int]) -> str:
    """A regex matching ``http(s)://ANY-HOST:PORT`` for the given ports (a default port may also be left out)."""
    numbers = sorted({port for port in ports if port > 0})
    alternatives = [rf"https?://{_HOST}:(?:{'|'.join(str(port) for port in numbers)})"] if numbers else []
    alternatives += [rf"{scheme}://{_HOST}" for scheme, port in _DEFAULT_PORTS.items() if port in numbers]
    return "|".join(f"(?:{alternative})" for alternative in alternatives) or "(?!)"


def _host_and_port(authority: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{authority}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme, -1)


def same_host_origin(origin: str, host_header: str, ports: frozenset[int]) -> bool:
    """Whether ``origin`` is on one of ``ports`` of the host named by the request's ``Host`` header."""
    scheme, _, authority = origin.partition("://")
    if scheme not in _DEFAULT_PORTS or not authority or "/" in authority:
        return False
    source = _host_and_port(authority, scheme)
    target = _host_and_port(host_header, scheme)
    return source is not None and target is not None and source[1] in ports and source[0] == target[0]


def _header(scope: Scope, name: bytes) -> str | None:
    value = header(scope, name)
    return None if value is None else value.decode("latin-1")


class CrossOriginMiddleware:
    """CORS for the gateway's own pages; other origins get no CORS headers, and 403 for anything but GET/HEAD."""

    def __init__(self, app: ASGIApp, ports: Iterable[int], render: Renderer) -> None:
        self.app = app
        self.ports = frozenset(port for port in ports if port > 0)
        self.render = render
        self.regex = re.compile(origin_regex(self.ports))
        self.cors = CORSMiddleware(
            app, allow_origin_regex=self.regex.pattern, allow_methods=ALLOWED_METHODS, allow_headers=["*"]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None:
            await self.app(scope, receive, send)
        elif self.allows(origin, _header(scope, b"host") or ""):
            await self.cors(scope, receive, send)
        elif scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
        else:
            error = ForbiddenError(
                f"cross-origin {scope['method']} from {origin} refused: browsers may call this server only from "
                f"its own pages (ports {', '.join(str(port) for port in sorted(self.ports))} of the same host)"
            )
            await self.render(error)(scope, receive, send)

    def allows(self, origin: str, host_header: str) -> bool:
        """Whether a browser page of ``origin`` may call this server, reached as ``host_header``."""
        return bool(self.regex.fullmatch(origin)) and same_host_origin(origin, host_header, self.ports)
