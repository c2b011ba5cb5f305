"""Wire schemas of the Snowflake external-function API (port 3004): rows in, rows out (takeoff-spec §2.5)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SnowflakeRequest(BaseModel):
    """A batch of rows: ``[row_number, argument]`` each, the argument a ``GenerateRequest`` object or a prompt."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    data: list[tuple[int, dict[str, Any] | str]] = Field(..., description="Rows: [row number, GenerateRequest].")


class SnowflakeResponse(BaseModel):
    """One ``[row_number, result]`` per row, same numbers: the text, the whole answer with ``return_metadata``, or
    ``{"error", "error_type"}`` for a row that failed."""

    data: list[tuple[int, Any]]
