"""The fake readers of the in-process gateway (tests/unit/inprocess.py): what they answer, as real readers would.

Generations echo their prompt word by word, as the echo backend does (each word with the whitespace before it), and
end with a final frame; a :class:`Behaviour` makes them fail or go silent. Tokenizer services, embeddings
(``DIMENSIONS`` floats per input), classifications and LoRA changes answer with one result.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liftoff.core.errors import InvalidRequestError, LiftoffError
from liftoff.core.frames import RequestFrame
from liftoff.core.types import RequestKind

DIMENSIONS = 4  # floats in every embedding the fake readers return
WORD = re.compile(r"\s*\S+")


def words(text: str) -> list[str]:
    """The echo backend's tokens: each word with the whitespace before it (joined, they give the text back)."""
    return WORD.findall(text)


def embedding(text: str, index: int) -> list[float]:
    """The fake embedding of input ``index``: its word count, its index, then two constants (exact in float32)."""
    return [float(len(words(text))), float(index), 0.5, -1.0]


def _row(values: list[float]) -> bytes:
    return array("f", values).tobytes()  # little-endian on every machine these tests run on


@dataclass
class Behaviour:
    """How a fake reader answers generations: normally, failing after ``fail_after`` tokens, or going silent after
    ``stall_after`` tokens (until the request is aborted or its reader lost)."""

    fail: LiftoffError | None = None
    fail_after: int = 0
    stall_after: int | None = None


HOLD = Behaviour(stall_after=0)  # take requests and answer nothing


@dataclass
class FakeReader:
    """One reader as the fake broker sees it."""

    reader_id: str
    groups: tuple[str, ...]
    model_type: str
    capacity: int
    behaviour: Behaviour = field(default_factory=Behaviour)
    loras: list[str] = field(default_factory=list)
    ready: bool = False
    running: dict[str, RequestFrame] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)  # request → frames sent (requests that have output)


def _tokenize(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    tokens = words(payload["text"])
    return {"tokens": tokens, "tokens_count": len(tokens)}


def _detokenize(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    if any(isinstance(token, int) for token in payload["tokens"]):
        raise InvalidRequestError("the echo backend has no vocabulary ids; pass token strings", param="tokens")
    return {"text": "".join(payload["tokens"])}


def _chat_template(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    tail = "<|assistant|>" if payload.get("add_generation_prompt") else ""
    return {
        "messages": [
            "".join(f"<|{turn['role']}|>{turn['content']}" for turn in chat) + tail for chat in payload["inputs"]
        ]
    }


def _encode(inputs: list[str | list[str]], rows: list[bytes]) -> dict[str, Any]:
    tokens = [len(words(item if isinstance(item, str) else " ".join(item))) for item in inputs]
    return {"rows": rows, "tokens": tokens, "truncated": [], "batch_sizes": [len(inputs)] * len(inputs)}


def _embed(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    inputs = payload["inputs"]
    return _encode(inputs, [_row(embedding(text, index)) for index, text in enumerate(inputs)])


def _classify(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    """Two logits per input: 0 and the input's word count (so a longer document is more relevant)."""
    inputs = payload["inputs"]
    texts = [item if isinstance(item, str) else item[-1] for item in inputs]
    return _encode(inputs, [_row([0.0, float(len(words(text)))]) for text in texts])


def _add_lora(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    if payload["name"] in reader.loras:
        raise InvalidRequestError(f"the reader already has a LoRA adapter named {payload['name']!r}", param="name")
    reader.loras.append(payload["name"])
    return {"loras": list(reader.loras)}


def _remove_lora(reader: FakeReader, payload: dict[str, Any]) -> dict[str, Any]:
    if payload["name"] not in reader.loras:
        raise InvalidRequestError(f"no LoRA adapter {payload['name']!r}", param="name")
    reader.loras.remove(payload["name"])
    return {"loras": list(reader.loras)}


ANSWERS: dict[RequestKind, Callable[[FakeReader, dict[str, Any]], dict[str, Any]]] = {
    RequestKind.TOKENIZE: _tokenize,
    RequestKind.DETOKENIZE: _detokenize,
    RequestKind.CHAT_TEMPLATE: _chat_template,
    RequestKind.EMBED: _embed,
    RequestKind.CLASSIFY: _classify,
    RequestKind.ADD_LORA: _add_lora,
    RequestKind.REMOVE_LORA: _remove_lora,
}
