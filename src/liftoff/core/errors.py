"""The one error taxonomy of Liftoff.

Every failure that reaches a client is a :class:`LiftoffError` subclass with a stable ``error_type`` string
(the key used on the wire, in frames and in response bodies) and an HTTP status. Surfaces render these; nothing
here knows about HTTP frameworks.
"""

from __future__ import annotations

from typing import ClassVar


class LiftoffError(Exception):
    """Base class of every error Liftoff reports to a client."""

    error_type: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's response (none by default)."""
        return {}


class InvalidRequestError(LiftoffError):
    """The request is well-formed JSON but asks for something invalid (limits, values)."""

    error_type = "invalid_request"
    status = 400


class ValidationFailedError(LiftoffError):
    """The request body is malformed: not JSON, wrong types, missing fields."""

    error_type = "validation_error"
    status = 422

    def __init__(self, message: str, *, errors: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class ContextLengthExceededError(InvalidRequestError):
    """The prompt does not fit in the model's context."""

    error_type = "context_length_exceeded"


class UnknownHostError(InvalidRequestError):
    """The request's ``Host`` is not one of the server's names (``allowed_hosts``): a DNS-rebinding page, or a
    name the operator has not listed."""

    error_type = "unknown_host"


class UnauthorizedError(LiftoffError):
    """The port requires a key (``api_keys``, ``management_api_keys``, ``reader_secret``) and the request has none,
    or a wrong one."""

    error_type = "unauthorized"
    status = 401

    def headers(self) -> dict[str, str]:
        """``WWW-Authenticate``, as HTTP's 401 asks: Bearer, so that browsers show no password dialog of their own."""
        return {"WWW-Authenticate": 'Bearer realm="liftoff"'}


class ForbiddenError(LiftoffError):
    """The request is refused whatever its content (a cross-origin browser request from a foreign page)."""

    error_type = "forbidden"
    status = 403


class NotFoundError(LiftoffError):
    """An addressed object (reader, consumer group, route) does not exist."""

    error_type = "not_found"
    status = 404


class PayloadTooLargeError(LiftoffError):
    """The HTTP body is larger than ``body_size_limit_bytes``."""

    error_type = "payload_too_large"
    status = 413


class SlowClientError(LiftoffError):
    """The client did not send its request's headers or body in time (``header_timeout_s``, ``body_timeout_s``)."""

    error_type = "request_timeout"
    status = 408


class OverloadedError(LiftoffError):
    """Too many requests are queued (``max_queued_requests``) or connections open (``max_connections``)."""

    error_type = "overloaded"
    status = 429
    retry_after_s: ClassVar[int] = 1  # queues on one machine move within seconds: a client may retry soon

    def headers(self) -> dict[str, str]:
        """``Retry-After``, as HTTP's 429 asks."""
        return {"Retry-After": str(self.retry_after_s)}


class NotSupportedError(LiftoffError):
    """The addressed readers cannot serve this kind of request."""

    error_type = "not_supported"
    status = 400


class NoReadersAvailableError(LiftoffError):
    """No live reader can take the request (fail fast instead of queueing forever)."""

    error_type = "unavailable"
    status = 503


class ReaderDiedError(LiftoffError):
    """The reader serving the request died or went silent after it had started."""

    error_type = "reader_died"
    status = 503


class RequestTimeoutError(LiftoffError):
    """The request's deadline passed."""

    error_type = "timeout"
    status = 504


class RequestCancelledError(LiftoffError):
    """The request was cancelled (client disconnect, shutdown or reader deletion)."""

    error_type = "cancelled"
    status = 499


class BackendError(LiftoffError):
    """The model backend failed while serving the request."""

    error_type = "generation_error"
    status = 500


class UpstreamError(LiftoffError):
    """The server an API reader forwards to failed in a way that is not the client's fault (it refused the
    reader's key, or answered something unreadable)."""

    error_type = "upstream_error"
    status = 502


class UpstreamUnavailableError(UpstreamError):
    """The API reader's upstream could not be reached, or kept answering 429/5xx until the retries ran out."""

    error_type = "upstream_unavailable"
    status = 503


class UpstreamTimeoutError(UpstreamError):
    """The API reader's upstream did not answer (or went silent mid-stream) within ``api_timeout_s``."""

    error_type = "upstream_timeout"
    status = 504


class BrokerUnavailableError(LiftoffError):
    """The broker (Redis) cannot be reached: the request cannot be queued, or its replies cannot arrive."""

    error_type = "broker_unavailable"
    status = 503


class ShuttingDownError(LiftoffError):
    """The server is shutting down and takes no new work."""

    error_type = "shutting_down"
    status = 503


_BY_TYPE: dict[str, type[LiftoffError]] = {}


def _index(cls: type[LiftoffError]) -> None:
    for sub in cls.__subclasses__():
        _BY_TYPE.setdefault(sub.error_type, sub)
        _index(sub)


_index(LiftoffError)
_BY_TYPE[LiftoffError.error_type] = LiftoffError


def error_from_type(error_type: str, message: str) -> LiftoffError:
    """Rebuild an error from its wire form (``error_type`` + message), e.g. from an error frame."""
    cls = _BY_TYPE.get(error_type, LiftoffError)
    if cls is ValidationFailedError:
        return ValidationFailedError(message)
    return cls(message)
