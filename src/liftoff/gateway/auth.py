"""Keys: a port with keys (``api_keys``, ``management_api_keys``, ``reader_secret`` on the internal port) answers
a request only if it carries one of them; everything else gets a 401 in the port's own error shape.

A key is accepted as ``Authorization: Bearer KEY`` (the OpenAI SDK's way), ``X-API-Key: KEY``, or HTTP Basic
with the key as password (or as user name with no password): Takeoff's official client cannot send headers, but
it passes a URL's user information on, so ``http://liftoff:KEY@host`` works with it. Keys are compared as SHA-256
digests with :func:`hmac.compare_digest`, against every key, so the time taken tells nothing about any of them.

Pure ASGI, as it is on every request's path. A few paths stay open, whatever the keys: health checks (probes
send no key), SageMaker's ``/ping``, and the web UI's own files (pages and scripts hold no data; the data they
fetch needs the key, which the pages ask for). ``OPTIONS`` is answered by the CORS layer before this one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from liftoff.core.errors import UnauthorizedError
from liftoff.gateway.errors import Renderer
from liftoff.gateway.surfaces.ui import PAGES

OPEN_EVERYWHERE = frozenset({"/healthz", "/health"})
# config key of the port → more paths open without a key; a path ending in "/" opens everything under it
OPEN_PATHS: dict[str, frozenset[str]] = {
    "port": frozenset({*PAGES, "/ui/"}),
    "sagemaker_port": frozenset({"/ping"}),
}
# the config key of each port's keys
KEYS_OF_PORT: dict[str, str] = {"management_port": "management_api_keys", "internal_port": "reader_secret"}
DEFAULT_KEYS = "api_keys"


def digest(key: str | bytes) -> bytes:
    """The SHA-256 of a key: what is compared, so every comparison has the same length."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries: ``X-API-Key`` (which a proxy's own ``Authorization`` cannot shadow), else
    ``Authorization: Bearer`` or ``Basic``; None when there is none."""
    authorization = None
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return bytes(value).strip()
        if name == b"authorization":
            authorization = bytes(value).strip()
    if authorization is None:
        return None
    scheme, _, credentials = authorization.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return credentials.strip()
    return _basic_key(credentials.strip()) if scheme == b"basic" else None


def _basic_key(credentials: bytes) -> bytes | None:
    try:
        user, _, password = base64.b64decode(credentials, validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return password or user or None


class KeyGuard:
    """Let through requests that carry one of ``keys`` (and those to ``open_paths``); 401 for the others."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], render: Renderer, open_paths: frozenset[str],
                 what: str) -> None:  # fmt: skip
        self.app = app
        self.digests = tuple(digest(key) for key in keys)
        self.render = render
        self.exact = open_paths | OPEN_EVERYWHERE
        self.prefixes = tuple(path for path in open_paths if path.endswith("/") and path != "/")
        self.what = what

    def is_open(self, path: str) -> bool:
        """Whether ``path`` is served without a key."""
        return path in self.exact or path.startswith(self.prefixes)

    def accepts(self, key: bytes | None) -> bool:
        """Whether ``key`` is one of the keys (compared with each, in constant time)."""
        if key is None:
            return False
        presented = digest(key)
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(presented, known)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if self.accepts(key):
            await self.app(scope, receive, send)
            return
        error = UnauthorizedError(
            f"this port needs a key ({self.what}): send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            if key is None
            else f"the key is not one of this port's keys ({self.what})"
        )
        response = self.render(error)
        if scope["type"] == "http":
            await response(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})  # fmt: skip
            await send({"type": "websocket.http.response.body", "body": bytes(response.body)})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})


def guard(app: ASGIApp, port_key: str, keys: Iterable[str], render: Renderer,
          extra_open: Iterable[str] = ()) -> ASGIApp:  # fmt: skip
    """``app`` behind a :class:`KeyGuard` of the port ``port_key``, or ``app`` itself when the port has no keys."""
    keys = tuple(keys)
    if not keys:
        return app
    open_paths = OPEN_PATHS.get(port_key, frozenset()) | frozenset(extra_open)
    return KeyGuard(app, keys, render, open_paths, KEYS_OF_PORT.get(port_key, DEFAULT_KEYS))
