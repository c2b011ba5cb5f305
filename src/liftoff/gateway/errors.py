"""The one place where exceptions become HTTP responses.

Each surface has a renderer (native JSON for the native, management, Vertex, Snowflake and SageMaker ports;
OpenAI's ``{"error": {...}}`` for the OpenAI port) and :func:`install_error_handlers`
registers, for an app, handlers by base class: :class:`LiftoffError`, FastAPI's validation error, Starlette's
HTTP errors (404, 405) and any other exception (a 500 whose details go to the log, not the client).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from liftoff.core.errors import InvalidRequestError, LiftoffError, ValidationFailedError
from liftoff.protocol.limits import describe_range

logger = logging.getLogger(__name__)

Renderer = Callable[[LiftoffError], Response]

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class HTTPStatusError(LiftoffError):
    """A plain HTTP error from routing (unknown path, wrong method)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]
        self.error_type = _HTTP_TYPES.get(status, "http_error")  # type: ignore[misc]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with msgspec (fast, no pydantic on the hot path)."""
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


def render_native(exc: LiftoffError) -> Response:
    """``{"detail", "error_type"}`` (plus ``errors`` for invalid fields) with the error's status."""
    body: dict[str, Any] = {"detail": exc.message, "error_type": exc.error_type}
    if isinstance(exc, ValidationFailedError) and exc.errors:
        body["errors"] = exc.errors
    return json_response(body, exc.status, exc.headers() or None)


_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout_error",
                 413: "invalid_request_error", 429: "rate_limit_error", 499: "request_cancelled",
                 503: "service_unavailable_error", 504: "timeout_error"}  # fmt: skip


def openai_error(exc: LiftoffError) -> tuple[int, dict[str, Any]]:
    """Status and body of an error on the OpenAI port: ``{"error": {"message", "type", "param", "code"}}``.

    Malformed bodies are 400s there (OpenAI answers 400 where the native API answers 422).
    """
    status = 400 if isinstance(exc, ValidationFailedError) else exc.status
    param = "model" if exc.param == "consumer_group" else exc.param  # ``model`` names the group there
    if param is None and isinstance(exc, ValidationFailedError) and exc.errors:
        param = str(exc.errors[0]["loc"])
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.error_type}}


def render_openai(exc: LiftoffError) -> Response:
    """An error response in OpenAI's shape (see :func:`openai_error`)."""
    status, body = openai_error(exc)
    return json_response(body, status, exc.headers() or None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def _is_branch(part: object) -> bool:
    """Whether a location part names a member of a union type (``list[str]``, ``constrained-str``), not a field."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or part.startswith(("constrained-", "function-"))


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body" and not _is_branch(part)) or "body"


# Errors that are about a value's size, not the body's shape: a 400 ("limits exceeded"), like Liftoff's own limits.
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                           "too_long", "string_too_long"})  # fmt: skip


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range_message(error: Any, model: type[BaseModel] | None) -> str:
    """``max_new_tokens is 18446744073709551621; allowed: from 1 to 1048576``."""
    loc = tuple(part for part in error["loc"] if not _is_branch(part))
    where = _location(loc)
    if error["type"] in ("too_long", "string_too_long"):
        return f"{where}: {error['msg'].lower()}"
    field = model.model_fields.get(str(loc[-1])) if model is not None and len(loc) == 1 else None
    allowed = describe_range(field.metadata) if field is not None else None
    if error["type"] == "finite_number" or (
        isinstance(error.get("input"), float) and not math.isfinite(error["input"])
    ):
        return f"{where} must be a finite number" + (f" ({allowed})" if allowed else "")
    return f"{where} is {_shown(error.get('input'))}; allowed: {allowed or error['msg'].lower()}"


def _unknown_field(loc: tuple[Any, ...], model: type[BaseModel] | None) -> InvalidRequestError:
    where = _location(loc)
    known = f" (this body takes: {', '.join(model.model_fields)})" if model is not None and len(loc) == 1 else ""
    return InvalidRequestError(f"{where} is not a field this endpoint knows; leave it out{known}", param=where)


def _other_member(error: Any, fields: set[str]) -> bool:
    """A type mismatch with another member of a union whose value is out of range in its own member
    (``stop: str | list[str]`` given a list holding a string too long): the range is the news, not the type."""
    where = _location(tuple(error["loc"]))
    return str(error["type"]).endswith("_type") and any(f == where or f.startswith(where + ".") for f in fields)


def from_validation_error(
    exc: ValidationError | RequestValidationError, model: type[BaseModel] | None = None
) -> LiftoffError:
    """Turn a pydantic or FastAPI validation error into a Liftoff error that names every bad field.

    Malformed JSON, unknown fields and values out of their range are 400s (what to fix is plain: a range is named
    from ``model``'s constraints when given); wrong types and missing fields are 422s listing each field.
    """
    errors = exc.errors() if isinstance(exc, RequestValidationError) else exc.errors(include_url=False)
    for error in errors:
        if error["type"] == "json_invalid":
            return InvalidRequestError(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        if error["type"] == "extra_forbidden":
            return _unknown_field(tuple(error["loc"]), model)
    ranged = [error for error in errors if error["type"] in _RANGE_ERRORS]
    fields = {_location(tuple(error["loc"])) for error in ranged}
    if ranged and all(error in ranged or _other_member(error, fields) for error in errors):
        message = "; ".join(_range_message(error, model) for error in ranged)
        return InvalidRequestError(message, param=_location(tuple(ranged[0]["loc"])))
    listed = [{"loc": _location(tuple(error["loc"])), "msg": error["msg"], "type": error["type"]} for error in errors]
    message = "; ".join(f"{item['loc']}: {item['msg']}" for item in listed)
    return ValidationFailedError(f"invalid request body: {message}", errors=listed)


def error_response(render: Renderer, exc: Exception, method: str, path: str) -> Response:
    """Any exception as the response ``render`` gives it: a Liftoff error as it is, a validation error as the 400
    or 422 that names the fields, a routing error with its status, anything else as a 500 whose details go to the
    log only. The one catch-all: FastAPI's handlers and the fast routes (gateway/fastpath.py) both end here."""
    if isinstance(exc, LiftoffError):
        return render(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return render(from_validation_error(exc))
    if isinstance(exc, StarletteHTTPException):
        return render(HTTPStatusError(exc.status_code, str(exc.detail)))
    logger.error("unhandled error on %s %s", method, path, exc_info=exc)
    return render(LiftoffError("internal server error; see the server log"))


def install_error_handlers(app: FastAPI, render: Renderer) -> None:
    """Register :func:`error_response` on ``app`` for every error kind, rendering with ``render``."""

    async def handler(request: Request, exc: Exception) -> Response:
        return error_response(render, exc, request.method, request.url.path)

    for kind in (LiftoffError, RequestValidationError, ValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handler)
