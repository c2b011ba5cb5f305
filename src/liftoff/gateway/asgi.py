"""Reading raw ASGI scopes, for the pure-ASGI layers (body limit, CORS, observation) that run before any routing."""

from __future__ import annotations

from starlette.types import Scope


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of the header ``name`` (lower case) of an HTTP scope, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None
