"""The ``Host`` allow-list (``allowed_hosts``): a request addressed to a name this server does not answer to gets
a 400 before anything else looks at it.

This closes DNS rebinding: a page on ``http://evil.example:3001`` whose name the attacker then points at the
victim's Liftoff sends requests with ``Host: evil.example:3001`` and its own origin, so the browser's same-origin
rule and the CORS check (which compares ``Origin`` with ``Host``) both pass; only the name gives it away. The
names accepted are localhost (and ``*.localhost``), this machine's host names, the bind hosts, and
``allowed_hosts``. IP addresses always pass: a rebinding page is reached through a name, never an address.
Requests without a ``Host`` (HTTP/1.0 clients; no browser) pass too. WebSocket handshakes are not checked here:
the internal port refuses every handshake that comes from a page (it has an ``Origin``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from liftoff.config.access import own_names
from liftoff.config.models import AppConfig
from liftoff.core.errors import UnknownHostError
from liftoff.gateway.asgi import header
from liftoff.gateway.errors import Renderer

_CACHE_SIZE = 1024  # Host values remembered with their verdict (most clients send one or two)


_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%a-z]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?$")


def host_name(value: str) -> str | None:
    """The name in a ``Host`` header (lower case, without the port or a trailing dot), or None if malformed."""
    match = _HOST.match(value.strip())
    if match is None:
        return None
    name = (match.group("v6") or match.group("name")).lower().rstrip(".")
    return name or None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


class HostNames:
    """The names a gateway answers to: exact names, ``.suffix`` patterns, or anything (``*``)."""

    def __init__(self, allowed: Iterable[str], own: Iterable[str]) -> None:
        entries = [entry.strip().lower().rstrip(".") for entry in allowed if entry.strip()]
        self.any = "*" in entries
        self.suffixes = tuple({".localhost", *(entry for entry in entries if entry.startswith("."))})
        self.names = frozenset({*own, *(entry for entry in entries if not entry.startswith("."))})

    @classmethod
    def of(cls, config: AppConfig) -> HostNames:
        """The names of a gateway with this configuration."""
        return cls(config.allowed_hosts, own_names((config.host, config.management_host, config.internal_host)))

    def allows(self, value: str) -> bool:
        """Whether a ``Host`` header value names this server."""
        if self.any:
            return True
        name = host_name(value)
        if name is None:
            return False
        return (
            name in self.names
            or _is_address(name)
            or any(name == suffix[1:] or name.endswith(suffix) for suffix in self.suffixes)
        )


class HostGuard:
    """400 ``unknown_host`` for HTTP requests whose ``Host`` is not one of ``names``; pure ASGI."""

    def __init__(self, app: ASGIApp, names: HostNames, render: Renderer) -> None:
        self.app = app
        self.names = names
        self.render = render
        self._verdicts: dict[bytes, bool] = {}

    def allows(self, raw: bytes) -> bool:
        """Whether the raw ``Host`` header is allowed (remembered for the next request)."""
        verdict = self._verdicts.get(raw)
        if verdict is None:
            verdict = self.names.allows(raw.decode("latin-1"))
            if len(self._verdicts) < _CACHE_SIZE:
                self._verdicts[raw] = verdict
        return verdict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = header(scope, b"host") if scope["type"] == "http" else None
        if raw is None or self.allows(raw):
            await self.app(scope, receive, send)
            return
        shown = raw.decode("latin-1")[:100]
        error = UnknownHostError(
            f"this server does not answer to the name {shown!r}; if it is one of its names, add it to allowed_hosts",
            param="host",
        )
        await self.render(error)(scope, receive, send)
