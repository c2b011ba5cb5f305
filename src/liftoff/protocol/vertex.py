"""Wire schemas of the Vertex AI API (port 3002): a prediction request and its answers (takeoff-spec §2.3).

The request's ``instances`` stay plain objects here: each is a ``GenerateRequest`` over the shared ``parameters``
(an explicit ``null`` keeps the parameter), or, for a group of embedding readers, Vertex's text-embedding instance
``{"content": ...}``; :mod:`liftoff.gateway.translate.vertex` validates them once they are merged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from liftoff.protocol.native import GenerateResponse


class VertexRequest(BaseModel):
    """A Vertex AI prediction request."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    instances: list[dict[str, Any]] = Field(..., min_length=1, description="One GenerateRequest per prediction.")
    parameters: dict[str, Any] | None = Field(None, description="Defaults of every instance's fields.")


class VertexResponse(BaseModel):
    """One prediction per instance, in order."""

    predictions: list[GenerateResponse]


class EmbeddingStatistics(BaseModel):
    """What Vertex's text-embedding answer says about the input."""

    token_count: int
    truncated: bool


class EmbeddingValues(BaseModel):
    """One text-embedding prediction's vector."""

    values: list[float]
    statistics: EmbeddingStatistics


class EmbeddingPrediction(BaseModel):
    """Vertex's text-embedding prediction: ``{"embeddings": {"values", "statistics"}}``."""

    embeddings: EmbeddingValues
