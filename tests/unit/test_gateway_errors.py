"""``liftoff.gateway.errors``: validation errors become 400 (bad JSON) or 422 (naming each bad field)."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from liftoff.core.errors import (
    InvalidRequestError,
    LiftoffError,
    NoReadersAvailableError,
    NotFoundError,
    NotSupportedError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ValidationFailedError,
)
from liftoff.gateway.errors import HTTPStatusError, from_validation_error, render_native, render_openai
from liftoff.protocol.native import GenerateRequest


def error_for(body: bytes) -> LiftoffError:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate_json(body)
    return from_validation_error(info.value)


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"text": "a",}', b"\xff\xfe"])
def test_invalid_json_is_invalid_request_400(body: bytes) -> None:
    error = error_for(body)
    assert type(error) is InvalidRequestError
    assert error.status == 400
    assert error.error_type == "invalid_request"
    assert error.message.startswith("the body is not valid JSON: ")


def test_field_errors_are_validation_failed_422_naming_fields() -> None:
    error = error_for(b'{"text": "hi", "max_new_tokens": "ten", "sampling_topp": 1.5}')
    assert isinstance(error, ValidationFailedError)
    assert error.status == 422
    assert error.error_type == "validation_error"
    locations = [item["loc"] for item in error.errors]
    assert locations == ["max_new_tokens", "sampling_topp"]
    assert all(set(item) == {"loc", "msg", "type"} for item in error.errors)
    assert "max_new_tokens: " in error.message
    assert "sampling_topp: " in error.message
    assert error.message.startswith("invalid request body: ")


def test_missing_field_is_named() -> None:
    error = error_for(b'{"consumer_group": "primary"}')
    assert isinstance(error, ValidationFailedError)
    assert error.errors == [{"loc": "text", "msg": "Field required", "type": "missing"}]


def test_wrong_top_level_type_is_located_at_body() -> None:
    error = error_for(b'["a list"]')
    assert isinstance(error, ValidationFailedError)
    assert [item["loc"] for item in error.errors] == ["body"]


def test_strict_types_are_not_coerced() -> None:
    error = error_for(b'{"text": "hi", "use_chat_template": "yes"}')
    assert isinstance(error, ValidationFailedError)
    assert [item["loc"] for item in error.errors] == ["use_chat_template"]


def test_fastapi_error_drops_the_body_prefix() -> None:
    exc = RequestValidationError(
        [
            {"type": "missing", "loc": ("body", "text"), "msg": "Field required", "input": None},
            {"type": "int_type", "loc": ("body", "items", 2), "msg": "bad int", "input": "x"},
            {"type": "model_type", "loc": ("body",), "msg": "Input should be an object", "input": 1},
        ]
    )
    error = from_validation_error(exc)
    assert isinstance(error, ValidationFailedError)
    assert [item["loc"] for item in error.errors] == ["text", "items.2", "body"]


def test_fastapi_json_invalid_is_400() -> None:
    exc = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}]
    )
    error = from_validation_error(exc)
    assert type(error) is InvalidRequestError
    assert error.message == "the body is not valid JSON: Expecting value"


def test_render_native_body_and_status() -> None:
    response = render_native(NotFoundError("no reader 'x'"))
    assert response.status_code == 404
    assert response.media_type == "application/json"
    assert json.loads(bytes(response.body)) == {"detail": "no reader 'x'", "error_type": "not_found"}


def test_render_native_lists_field_errors() -> None:
    error = error_for(b'{"text": 5}')
    response = render_native(error)
    body = json.loads(bytes(response.body))
    assert response.status_code == 422
    assert body["error_type"] == "validation_error"
    assert [item["loc"] for item in body["errors"]] == ["text", "text"]  # one per member of str | list[str]


@pytest.mark.parametrize(
    ("status", "error_type"), [(404, "not_found"), (405, "method_not_allowed"), (418, "http_error")]
)
def test_http_status_error(status: int, error_type: str) -> None:
    error = HTTPStatusError(status, "nope")
    assert error.status == status
    assert error.error_type == error_type


def openai_body(exc: LiftoffError) -> tuple[int, dict[str, object]]:
    response = render_openai(exc)
    return response.status_code, json.loads(bytes(response.body))


def test_openai_renderer_uses_openai_shape_and_names_the_param() -> None:
    status, body = openai_body(NotSupportedError("tools is not supported", param="tools"))
    assert status == 400
    assert body == {"error": {"message": "tools is not supported", "type": "invalid_request_error",
                              "param": "tools", "code": "not_supported"}}  # fmt: skip


def test_openai_renderer_calls_the_consumer_group_model() -> None:
    status, body = openai_body(NotFoundError("consumer group 'x' does not exist", param="consumer_group"))
    assert status == 404
    assert body["error"] == {"message": "consumer group 'x' does not exist", "type": "not_found_error",
                             "param": "model", "code": "not_found"}  # fmt: skip


def test_openai_renderer_turns_malformed_bodies_into_400s_naming_the_first_field() -> None:
    status, body = openai_body(error_for(b'{"text": 5}'))
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "validation_error", "text")


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (NoReadersAvailableError("none"), 503, "service_unavailable_error"),
        (OverloadedError("full"), 429, "rate_limit_error"),
        (RequestTimeoutError("late"), 504, "timeout_error"),
        (LiftoffError("boom"), 500, "server_error"),
        (PayloadTooLargeError("big"), 413, "invalid_request_error"),
    ],
)
def test_openai_renderer_statuses_and_types(exc: LiftoffError, status: int, kind: str) -> None:
    got_status, body = openai_body(exc)
    assert got_status == status
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == (kind, exc.error_type, None)


def ranged_error(body: bytes, model: type = GenerateRequest) -> LiftoffError:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(body)
    return from_validation_error(info.value, model)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"text": "x", "max_new_tokens": 18446744073709551621}',
         "max_new_tokens is 18446744073709551621; allowed: from 1 to 1048576"),
        (b'{"text": "x", "sampling_topp": 0}', "sampling_topp is 0; allowed: more than 0 to 1"),
        (b'{"text": "x", "repetition_penalty": 1000}', "repetition_penalty is 1000; allowed: more than 0 to 100"),
        (b'{"text": "x", "sampling_temperature": NaN}', "sampling_temperature must be a finite number (from 0 to 100)"),
        (b'{"text": "x", "max_new_tokens": 1' + b"0" * 60 + b"}", "max_new_tokens is 1" + "0" * 36 + "..."),
    ],
)  # fmt: skip
def test_values_out_of_range_are_400s_naming_the_field_and_the_range(body: bytes, message: str) -> None:
    error = ranged_error(body)
    assert type(error) is InvalidRequestError
    assert error.status == 400
    assert message in error.message
    assert error.param == error.message.split(" ")[0]


def test_unknown_fields_are_400s_naming_them_and_what_the_body_takes() -> None:
    error = ranged_error(b'{"text": "x", "max_new_token": 3}')
    assert type(error) is InvalidRequestError
    assert error.message.startswith("max_new_token is not a field this endpoint knows; leave it out (this body takes:")
    assert "max_new_tokens" in error.message
    assert error.param == "max_new_token"


def test_a_type_error_beside_a_range_error_is_still_a_422() -> None:
    error = ranged_error(b'{"text": "x", "max_new_tokens": "ten", "sampling_topp": 1.5}')
    assert isinstance(error, ValidationFailedError)


def test_a_long_stop_string_is_a_range_error_not_the_other_union_members_type() -> None:
    from liftoff.protocol.openai import CompletionRequest

    body = b'{"model": "m", "prompt": "p", "stop": ["' + b"x" * 2000 + b'"]}'
    error = ranged_error(body, CompletionRequest)
    assert type(error) is InvalidRequestError
    assert error.message == "stop.0: string should have at most 1024 characters"


def test_overloaded_answers_carry_retry_after() -> None:
    assert render_native(OverloadedError("full")).headers["retry-after"] == "1"
    assert render_openai(OverloadedError("full")).headers["retry-after"] == "1"
    assert "retry-after" not in render_native(NotFoundError("no")).headers
