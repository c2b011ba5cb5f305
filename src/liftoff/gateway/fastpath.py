"""Fast dispatch of the hottest routes (``/generate``, ``/generate_stream``, ``/embed``, ``/v1/embeddings``).

Their handlers are the same functions FastAPI routes to (so OpenAPI documents them), but requests reach them
straight from this pure-ASGI layer, skipping FastAPI's routing, dependency and middleware stack, which costs
about as much per request as the rest of the gateway. Errors go through the same catch-all
(:func:`liftoff.gateway.errors.error_response`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from liftoff.gateway.errors import Renderer, error_response

Handler = Callable[[Request], Awaitable[Response]]


class FastRoutes:
    """Route ``(method, path)`` pairs directly to handlers; everything else goes to the FastAPI app."""

    def __init__(self, app: FastAPI, routes: Mapping[tuple[str, str], Handler], render: Renderer) -> None:
        self.app = app
        self.routes = routes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get((scope.get("method", ""), scope["path"])) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        try:
            response = await handler(Request(scope, receive))
        except Exception as exc:
            response = error_response(self.render, exc, scope["method"], scope["path"])
        await response(scope, receive, send)
