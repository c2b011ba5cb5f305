"""Vertex AI both ways: a prediction request into the ``GenerateRequest`` of each instance (or the texts of an
embedding request), checked against the batch limits, and encoder output into Vertex's text-embedding answer.

Validation errors name the instance (``instances.2.text``), as a client needs to find the bad one.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, ValidationFailedError
from liftoff.gateway.errors import from_validation_error
from liftoff.gateway.translate.encode import Encoded, floats
from liftoff.gateway.translate.native import DEFAULT_GROUP, prompt_count, prompts_of, utf8_size
from liftoff.protocol.native import GenerateRequest
from liftoff.protocol.vertex import EmbeddingPrediction, EmbeddingStatistics, EmbeddingValues, VertexRequest


def _fields(body: VertexRequest, instance: dict[str, Any]) -> dict[str, Any]:
    """An instance's fields over the shared parameters (an explicit ``null`` keeps the parameter)."""
    return {**(body.parameters or {}), **{key: value for key, value in instance.items() if value is not None}}


def instances(body: VertexRequest) -> list[GenerateRequest]:
    """Each instance over the shared parameters, validated; errors name the instance (``instances.2.text``)."""
    requests = []
    for index, instance in enumerate(body.instances):
        try:
            requests.append(GenerateRequest.model_validate(_fields(body, instance)))
        except ValidationError as exc:
            error = from_validation_error(exc, GenerateRequest)
            if not isinstance(error, ValidationFailedError):
                where = f"instances.{index}" + (f".{error.param}" if error.param else "")
                raise InvalidRequestError(f"instances.{index}: {error.message}", param=where) from None
            errors = [{**item, "loc": f"instances.{index}.{item['loc']}"} for item in error.errors]
            raise ValidationFailedError(f"instances.{index}: {error.message}", errors=errors) from None
    return requests


def check_instances(body: VertexRequest, config: AppConfig) -> None:
    """``max_user_batch_size`` counts instances before any is expanded (each may take the shared parameters)."""
    if len(body.instances) > config.max_user_batch_size:
        raise InvalidRequestError(
            f"instances has {len(body.instances)} items, more than max_user_batch_size ({config.max_user_batch_size})",
            param="instances",
        )


def check_prompts(requests: list[GenerateRequest], config: AppConfig) -> None:
    """All instances' prompts together against ``max_user_batch_size``, and their bytes against the body limit
    (shared ``parameters`` may repeat one text in every instance: what the readers get stays what a body holds)."""
    count = sum(prompt_count(request.text) for request in requests)
    if count > config.max_user_batch_size:
        raise InvalidRequestError(
            f"the instances hold {count} prompts, more than max_user_batch_size ({config.max_user_batch_size})",
            param="instances",
        )
    size = sum(utf8_size(text) for request in requests for text in prompts_of(request.text, config))
    if size > config.body_size_limit_bytes:
        raise InvalidRequestError(
            f"the instances hold {size} bytes of prompts, more than body_size_limit_bytes "
            f"({config.body_size_limit_bytes}); send fewer or shorter prompts",
            param="instances",
        )


def group_of(body: VertexRequest) -> str:
    """The consumer group the instances name (the first instance's, else the parameters', else the default)."""
    group = _fields(body, body.instances[0]).get("consumer_group")
    return group if isinstance(group, str) and group else DEFAULT_GROUP


def _content(instance: dict[str, Any], index: int) -> str:
    text = instance.get("content", instance.get("text"))
    if not isinstance(text, str):
        raise ValidationFailedError(
            f"instances.{index}: an embedding instance needs a string 'content' (or 'text')",
            errors=[{"loc": f"instances.{index}.content", "msg": "a string is required", "type": "string_type"}],
        )
    return text


def embedding_texts(body: VertexRequest) -> list[str]:
    """The texts of a text-embedding request (``content``, or ``text``, of each instance)."""
    return [_content(instance, index) for index, instance in enumerate(body.instances)]


def embedding_predictions(out: Encoded) -> list[dict[str, Any]]:
    """Encoder output as Vertex's text-embedding predictions, built from :class:`EmbeddingPrediction`."""
    truncated = set(out.truncated)
    return [
        EmbeddingPrediction(
            embeddings=EmbeddingValues(
                values=floats(row), statistics=EmbeddingStatistics(token_count=tokens, truncated=i in truncated)
            )
        ).model_dump()
        for i, (row, tokens) in enumerate(zip(out.rows, out.tokens, strict=True))
    ]
