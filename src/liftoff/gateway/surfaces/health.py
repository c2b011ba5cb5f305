"""``GET /healthz`` (and ``/health``, the name vLLM and GuideLLM use) on every port: 200 when readers have reached
the asked state, else 503.

``state`` is ``live`` (default: at least one live reader) or ``loading`` (at least one reader loading or live).
``wait`` long-polls for up to that long (seconds, or a duration like ``30s``, ``500ms``, ``2m``).
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from liftoff.core.clock import monotonic
from liftoff.core.errors import InvalidRequestError
from liftoff.core.types import ReaderState
from liftoff.gateway.errors import json_response
from liftoff.gateway.state import get_state
from liftoff.management.registry import ReaderRegistry

router = APIRouter(tags=["health"])

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_WAIT_S = 600.0


def parse_wait(value: str | None) -> float:
    """``wait`` in seconds: a number of seconds or a duration with a unit (ms, s, m, h)."""
    if value is None or value == "":
        return 0.0
    match = _DURATION.match(value)
    if match is None:
        raise InvalidRequestError(
            f"wait must be seconds or a duration like '30s' or '500ms', not {value!r}", param="wait"
        )
    return min(float(match.group(1)) * _UNIT_S[match.group(2)], MAX_WAIT_S)


def _reached(registry: ReaderRegistry, state: str) -> bool:
    live = registry.count(ReaderState.LIVE)
    return live > 0 if state == "live" else live + registry.count(ReaderState.LOADING) > 0


# Documented without a body schema: the body is in the shape of the port's errors (OpenAI's on the OpenAI port).
_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"description": "`wait` is not a duration"},
    422: {"description": "`state` is neither live nor loading"},
    503: {"description": "No reader has reached the state (the body is the same as the 200's)"},
}


@router.get("/healthz", responses=_RESPONSES)
@router.get("/health", include_in_schema=False)
async def healthz(
    request: Request,
    state: Literal["live", "loading"] = Query("live", description="The reader state to wait for."),
    wait: str | None = Query(None, description="How long to wait for it: seconds or e.g. '30s'."),
) -> Response:
    """Ready when at least one reader has reached ``state``."""
    registry = get_state(request).registry
    deadline = monotonic() + parse_wait(wait)
    while not _reached(registry, state) and monotonic() < deadline:
        await registry.wait_changed(deadline - monotonic())
    ok = _reached(registry, state)
    body = {
        "status": "ok" if ok else "unavailable",
        "state": state,
        "live_readers": registry.count(ReaderState.LIVE),
        "loading_readers": registry.count(ReaderState.LOADING),
        "dead_readers": registry.count(ReaderState.DEAD),
    }
    return json_response(body, 200 if ok else 503)
