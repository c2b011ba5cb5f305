"""The Snowflake API (port 3004): ``POST /generate_snowflake`` in Snowflake's external-function format.

Snowflake sends ``{"data": [[row, arg], ...]}`` where ``arg`` is a ``GenerateRequest`` object (built in SQL with
``OBJECT_CONSTRUCT('text', ...)``) or a plain prompt string, and wants ``{"data": [[row, result], ...]}`` back with
the same row numbers. ``result`` is the generated text (a list for a list of prompts; the whole ``/generate``
answer when ``return_metadata`` is set). Rows run at once. A row that fails does not fail the batch: its result is
``{"error": message, "error_type": kind}``, a VARIANT the query can test, and the other rows keep their text.
Only an envelope that is not Snowflake's shape fails the whole request.

Snowflake names each batch in the ``sf-external-function-query-batch-id`` header and resends a batch it did not
get an answer for. The header is echoed back, and the answers of recent batches are kept by id (and body), so a
resent batch is answered again without generating again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from liftoff.core.errors import LiftoffError, RequestCancelledError
from liftoff.gateway.dispatch import Collector
from liftoff.gateway.errors import json_response
from liftoff.gateway.generation import Generation, log_request
from liftoff.gateway.http import json_body, read_model
from liftoff.gateway.state import GatewayState, get_state
from liftoff.gateway.translate.snowflake import Parsed, error_cell, parse_rows, result_cell
from liftoff.protocol.native import ERROR_RESPONSES, GenerateRequest
from liftoff.protocol.snowflake import SnowflakeRequest, SnowflakeResponse

router = APIRouter(tags=["snowflake"])

BATCH_HEADER = "sf-external-function-query-batch-id"
REMEMBERED_BATCHES = 256

Row = tuple[int, Any]
Started = tuple[GenerateRequest, Collector] | LiftoffError


class _Answers:
    """The answers of the last batches, by batch id and body digest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def get(self, key: tuple[str, str]) -> bytes | None:
        return self._answers.get(key)

    def put(self, key: tuple[str, str], answer: bytes) -> None:
        self._answers[key] = answer
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)


_ANSWERS = _Answers(REMEMBERED_BATCHES)


def _start(generation: Generation, run: Parsed) -> Started:
    if isinstance(run, LiftoffError):
        return run
    try:
        return run, generation.start_generate(run)
    except LiftoffError as exc:
        return exc


async def _finish(generation: Generation, started: Started) -> Any:
    """A row's cell: its text (or answer), or its error. A client that has gone cancels the whole batch."""
    if isinstance(started, LiftoffError):
        return error_cell(started)
    body, collector = started
    try:
        result = await generation.generate_answer(body, collector)
    except RequestCancelledError:
        raise
    except LiftoffError as exc:
        return error_cell(exc)
    return result_cell(body, result)


async def _rows(request: Request, state: GatewayState, rows: list[tuple[int, dict[str, Any] | str]]) -> list[Row]:
    """Every row started at once, then each one's cell in order (a row that fails leaves the others running)."""
    with Generation(request, state) as generation:
        started = [(number, _start(generation, run)) for number, run in parse_rows(rows, state.config)]
        return [(number, await _finish(generation, run)) for number, run in started]


@router.post("/generate_snowflake", response_model=SnowflakeResponse, responses=ERROR_RESPONSES,
             openapi_extra=json_body(SnowflakeRequest))  # fmt: skip
async def generate_snowflake(request: Request) -> Response:
    """Generate for every row; a failed row gets an error object, the others their text."""
    state = get_state(request)
    batch_id = request.headers.get(BATCH_HEADER)
    headers = {BATCH_HEADER: batch_id} if batch_id else None
    key = (batch_id, hashlib.sha256(await request.body()).hexdigest()) if batch_id else None
    if key is not None and (answer := _ANSWERS.get(key)) is not None:
        return Response(answer, media_type="application/json", headers=headers)
    body = await read_model(request, SnowflakeRequest)
    result = {"data": await _rows(request, state, body.data)}
    log_request(state, "/generate_snowflake", body, result)
    response = json_response(result, headers=headers)
    if key is not None:
        _ANSWERS.put(key, bytes(response.body))
    return response
