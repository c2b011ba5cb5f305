"""``liftoff.gateway.translate.encode``: encoder bodies → broker requests, and reader results → floats."""

from __future__ import annotations

import base64
import math
import re
import struct

import pytest

from liftoff.config.models import AppConfig
from liftoff.core.errors import BackendError, InvalidRequestError
from liftoff.core.types import RequestKind
from liftoff.gateway.translate.encode import base64_row, encode_frame, encoded, floats, relevance

CONFIG = AppConfig(max_user_batch_size=3, max_prompt_string_bytes=10)


def test_embedding_frames_carry_every_input_and_the_truncation_choice() -> None:
    frame = encode_frame(RequestKind.EMBED, ["a", "b"], "vectors", CONFIG, truncate=False)
    assert frame.kind is RequestKind.EMBED
    assert frame.consumer_group == "vectors"
    assert frame.payload == {"inputs": ["a", "b"], "truncate": False}
    single = encode_frame(RequestKind.EMBED, "a", None, CONFIG)
    assert single.payload == {"inputs": ["a"]}
    assert single.consumer_group == "primary"


def test_classification_frames_keep_pairs() -> None:
    frame = encode_frame(RequestKind.CLASSIFY, [["q", "d"], "solo"], "c", CONFIG)
    assert frame.payload["inputs"] == [["q", "d"], "solo"]


@pytest.mark.parametrize(
    ("kind", "text", "words"),
    [
        (RequestKind.EMBED, [], "empty list"),
        (RequestKind.EMBED, ["a", "b", "c", "d"], "4 inputs, more than max_user_batch_size (3)"),
        (RequestKind.EMBED, ["0123456789a"], "input 0 is 11 bytes"),
        (RequestKind.CLASSIFY, [["01234", "567890"]], "input 0 is 11 bytes"),
        (RequestKind.CLASSIFY, [["a", "b", "c"]], "text[0] has 3 texts"),
    ],
)
def test_limits_and_shapes(kind: RequestKind, text: list[str] | list[list[str]], words: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        encode_frame(kind, text, None, CONFIG)


def test_rows_become_floats_and_base64() -> None:
    row = struct.pack("<3f", 1.0, -2.5, 0.125)
    assert floats(row) == [1.0, -2.5, 0.125]
    assert base64.b64decode(base64_row(row)) == row
    result = encoded({"rows": [row], "tokens": [3], "truncated": [], "batch_sizes": [2]})
    assert result.prompt_tokens == 3
    assert result.metadata() == {"prompt_tokens": 3, "tokens": [3], "batch_sizes": [2]}
    with pytest.raises(BackendError, match="lacks"):
        encoded({"rows": []})


def test_relevance_is_a_probability() -> None:
    assert relevance([0.0]) == 0.5
    assert relevance([2.0]) == pytest.approx(1 / (1 + math.exp(-2)))
    assert relevance([-1000.0]) == 0.0
    assert relevance([1.0, 1.0]) == pytest.approx(0.5)
    assert relevance([0.0, 3.0]) > 0.9
