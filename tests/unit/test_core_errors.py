"""``liftoff.core.errors``: each error kind is rebuilt from its wire form (``error_type`` + message)."""

from __future__ import annotations

import pytest

from liftoff.core import errors
from liftoff.core.errors import (
    BackendError,
    BrokerUnavailableError,
    ContextLengthExceededError,
    ForbiddenError,
    InvalidRequestError,
    LiftoffError,
    NoReadersAvailableError,
    NotFoundError,
    NotSupportedError,
    OverloadedError,
    PayloadTooLargeError,
    ReaderDiedError,
    RequestCancelledError,
    RequestTimeoutError,
    ShuttingDownError,
    SlowClientError,
    UnauthorizedError,
    UnknownHostError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    ValidationFailedError,
    error_from_type,
)

EXPECTED: dict[type[LiftoffError], tuple[str, int]] = {
    LiftoffError: ("internal_error", 500),
    InvalidRequestError: ("invalid_request", 400),
    ValidationFailedError: ("validation_error", 422),
    ContextLengthExceededError: ("context_length_exceeded", 400),
    ForbiddenError: ("forbidden", 403),
    UnauthorizedError: ("unauthorized", 401),
    UnknownHostError: ("unknown_host", 400),
    NotFoundError: ("not_found", 404),
    PayloadTooLargeError: ("payload_too_large", 413),
    SlowClientError: ("request_timeout", 408),
    OverloadedError: ("overloaded", 429),
    NotSupportedError: ("not_supported", 400),
    NoReadersAvailableError: ("unavailable", 503),
    ReaderDiedError: ("reader_died", 503),
    RequestTimeoutError: ("timeout", 504),
    RequestCancelledError: ("cancelled", 499),
    BackendError: ("generation_error", 500),
    ShuttingDownError: ("shutting_down", 503),
    BrokerUnavailableError: ("broker_unavailable", 503),
    UpstreamError: ("upstream_error", 502),
    UpstreamUnavailableError: ("upstream_unavailable", 503),
    UpstreamTimeoutError: ("upstream_timeout", 504),
}


def _module_error_classes() -> set[type[LiftoffError]]:
    found: set[type[LiftoffError]] = set()
    pending: list[type[LiftoffError]] = [LiftoffError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.add(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_expected_table_covers_every_error_class() -> None:
    assert _module_error_classes() == set(EXPECTED)


def test_error_types_are_unique() -> None:
    types = [cls.error_type for cls in _module_error_classes()]
    assert len(types) == len(set(types))


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_error_type_and_status(cls: type[LiftoffError]) -> None:
    assert (cls.error_type, cls.status) == EXPECTED[cls]


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_round_trip(cls: type[LiftoffError]) -> None:
    original = cls("something went wrong")
    rebuilt = error_from_type(original.error_type, original.message)
    assert type(rebuilt) is cls
    assert rebuilt.message == "something went wrong"
    assert str(rebuilt) == "something went wrong"
    assert rebuilt.status == original.status
    assert rebuilt.error_type == original.error_type


def test_rebuilt_validation_error_has_no_field_list() -> None:
    rebuilt = error_from_type("validation_error", "bad body")
    assert isinstance(rebuilt, ValidationFailedError)
    assert rebuilt.errors == []


@pytest.mark.parametrize("error_type", ["no_such_type", "", "Timeout"])
def test_unknown_type_is_an_internal_error(error_type: str) -> None:
    rebuilt = error_from_type(error_type, "odd")
    assert type(rebuilt) is LiftoffError
    assert rebuilt.status == 500
    assert rebuilt.error_type == "internal_error"
    assert rebuilt.message == "odd"


def test_param_is_kept() -> None:
    error = InvalidRequestError("bad wait", param="wait")
    assert error.param == "wait"
    assert LiftoffError("x").param is None


def test_hierarchy() -> None:
    assert issubclass(ContextLengthExceededError, InvalidRequestError)
    assert issubclass(UnknownHostError, InvalidRequestError)
    for cls in EXPECTED:
        assert issubclass(cls, Exception)


def test_unauthorized_asks_for_a_bearer_key() -> None:
    assert UnauthorizedError("no key").headers() == {"WWW-Authenticate": 'Bearer realm="liftoff"'}
