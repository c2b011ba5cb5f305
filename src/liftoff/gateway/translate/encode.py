"""Encoder requests ↔ core: embedding, classification and rerank bodies → one :class:`RequestFrame`; the reader's
result frame → vectors and scores.

A request travels whole (its inputs in ``payload``) and the reader's batcher splits it into batches. Its answer
carries each input's row as little-endian float32 bytes, which become JSON floats here, or go out as they are,
base64-encoded, for OpenAI's ``encoding_format: base64``.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from liftoff.config.models import AppConfig
from liftoff.core.errors import BackendError, InvalidRequestError
from liftoff.core.frames import RequestFrame
from liftoff.core.ids import new_request_id
from liftoff.core.types import RequestKind
from liftoff.gateway.translate.native import DEFAULT_GROUP, check_batch, utf8_size


@dataclass(frozen=True)
class Encoded:
    """What the reader returned for one request's inputs, in order."""

    rows: list[bytes]
    tokens: list[int]
    truncated: list[int]
    batch_sizes: list[int]

    @property
    def prompt_tokens(self) -> int:
        """Tokens of every input, after truncation."""
        return sum(self.tokens)

    def metadata(self) -> dict[str, Any]:
        """``metadata`` of a native answer."""
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "batch_sizes": self.batch_sizes}


def encoded(data: dict[str, Any]) -> Encoded:
    """Read a reader's result (``Batcher`` in the reader writes it)."""
    try:
        return Encoded(list(data["rows"]), list(data["tokens"]), list(data["truncated"]), list(data["batch_sizes"]))
    except (KeyError, TypeError) as exc:
        raise BackendError(f"the reader's answer lacks {exc}") from None


def floats(row: bytes) -> list[float]:
    """A float32 row as Python floats."""
    values = array("f")
    values.frombytes(row)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def base64_row(row: bytes) -> str:
    """A float32 row as OpenAI's ``encoding_format: base64`` sends it (little-endian float32, base64)."""
    return base64.b64encode(row).decode("ascii")


def _pairs(text: str | list[str] | list[list[str]]) -> list[str | list[str]]:
    if isinstance(text, str):
        return [text]
    items: list[str | list[str]] = list(text)
    for index, item in enumerate(items):
        if isinstance(item, list) and len(item) != 2:
            raise InvalidRequestError(
                f"text[{index}] has {len(item)} texts; a classification input is a text or a pair [text, text_pair]",
                param="text",
            )
    return items


def _check(items: list[str | list[str]], config: AppConfig) -> None:
    """Limits on the number and size of inputs (those of prompts; a pair's size is both texts')."""
    sizes = [utf8_size(item) if isinstance(item, str) else sum(map(utf8_size, item)) for item in items]
    check_batch(sizes, config, single=False, what="input")


def encode_frame(
    kind: RequestKind,
    text: str | list[str] | list[list[str]],
    group: str | None,
    config: AppConfig,
    truncate: bool | None = None,
) -> RequestFrame:
    """The broker request of an embedding (``EMBED``) or classification (``CLASSIFY``) body."""
    items: list[str | list[str]]
    if kind is RequestKind.CLASSIFY:
        items = _pairs(text)
    elif isinstance(text, str):
        items = [text]
    else:
        items = [item if isinstance(item, str) else list(item) for item in text]
    _check(items, config)
    payload: dict[str, Any] = {"inputs": items}
    if truncate is not None:
        payload["truncate"] = truncate
    return RequestFrame(request_id=new_request_id(), consumer_group=group or DEFAULT_GROUP, kind=kind, payload=payload)


def relevance(scores: list[float]) -> float:
    """A cross-encoder's relevance probability: sigmoid of a single logit, else softmax of the last label."""
    if len(scores) == 1:
        return 1.0 / (1.0 + math.exp(-scores[0])) if scores[0] > -700 else 0.0
    top = max(scores)
    weights = [math.exp(score - top) for score in scores]
    return weights[-1] / sum(weights)
