"""Snowflake both ways: the rows of an external-function batch into one ``GenerateRequest`` each (or the error that
row gets), checked against the batch limits, and a row's outcome into its result cell."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError
from liftoff.gateway.errors import from_validation_error
from liftoff.gateway.translate.native import prompt_count
from liftoff.protocol.native import GenerateRequest

Parsed = GenerateRequest | LiftoffError


def _row_request(argument: dict[str, Any] | str) -> Parsed:
    fields = {"text": argument} if isinstance(argument, str) else argument
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        return from_validation_error(exc, GenerateRequest)


def parse_rows(rows: list[tuple[int, dict[str, Any] | str]], config: AppConfig) -> list[tuple[int, Parsed]]:
    """Every row's request (or its error), after ``max_user_batch_size`` was checked on the rows and on their
    prompts together: nothing is started for a batch that is too large."""
    if len(rows) > config.max_user_batch_size:
        raise InvalidRequestError(
            f"data has {len(rows)} rows, more than max_user_batch_size ({config.max_user_batch_size})", param="data"
        )
    parsed = [(number, _row_request(argument)) for number, argument in rows]
    count = sum(prompt_count(run.text) for _, run in parsed if isinstance(run, GenerateRequest))
    if count > config.max_user_batch_size:
        raise InvalidRequestError(
            f"the rows hold {count} prompts, more than max_user_batch_size ({config.max_user_batch_size})",
            param="data",
        )
    return parsed


def error_cell(exc: LiftoffError) -> dict[str, str]:
    """A failed row's result: a VARIANT the query can test."""
    return {"error": exc.message, "error_type": exc.error_type}


def result_cell(request: GenerateRequest, answer: dict[str, Any]) -> Any:
    """A row's result: the generated text, or the whole ``/generate`` answer with ``return_metadata``."""
    return answer if request.return_metadata else answer["text"]
