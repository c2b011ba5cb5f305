"""``liftoff.backends.grammar_limits``: grammars over a reader's bounds are 400s before anything compiles."""

from __future__ import annotations

import json

import pytest

from liftoff.backends.grammar_limits import DEFAULT_COMPILE_TIMEOUT_S, GrammarLimits
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError

LIMITS = GrammarLimits(max_bytes=2000, max_repetition=100, compile_timeout_s=1.0)


def schema(value: object) -> str:
    return json.dumps(value)


@pytest.mark.parametrize(
    ("kind", "text", "words"),
    [
        ("json_schema", schema({"type": "string", "maxLength": 101}), "maxLength is 101"),
        ("json_schema", schema({"type": "array", "minItems": 500}), "minItems is 500"),
        ("json_schema", schema({"properties": {"a": {"properties": {"b": {"maxProperties": 1000}}}}}), "maxProp"),
        (
            "json_schema",
            schema({"anyOf": [{"type": "string"}, {"type": "string", "pattern": "[a-z]{5,500}"}]}),
            "in a pattern is 500",
        ),
        ("regex_string", "a{0,101}", "a {m,n} repetition is 101"),
        ("regex_string", "(ab){1000}", "is 1000"),
        ("json_schema", schema({"description": "x" * 3000}), "max_grammar_bytes (2000)"),
        ("json_schema", "[" * 100_000 + "]" * 100_000, "max_grammar_bytes"),
    ],
)
def test_grammars_over_the_bounds_are_refused_naming_the_setting(kind: str, text: str, words: str) -> None:
    with pytest.raises(InvalidRequestError, match="max_grammar") as caught:
        LIMITS.check(kind, text)
    assert words in caught.value.message
    assert caught.value.param == kind


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("json_schema", schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 100}}})),
        ("json_schema", schema({"type": "integer", "minimum": 0, "maximum": 10**18})),  # not a repetition
        ("regex_string", "[a-z]{1,100}\\d{4}"),
        ("json_schema", "true"),
    ],
)
def test_grammars_within_the_bounds_pass(kind: str, text: str) -> None:
    LIMITS.check(kind, text)


def test_a_deeply_nested_schema_is_walked_without_recursion() -> None:
    nested: object = {"type": "string", "maxLength": 101}
    for _ in range(400):
        nested = {"items": nested}
    text = schema(nested)
    with pytest.raises(InvalidRequestError, match="maxLength is 101"):
        GrammarLimits(max_bytes=len(text), max_repetition=100).check("json_schema", text)


def test_json_too_deep_to_parse_is_a_400() -> None:
    text = '{"a": ' * 50_000 + "1" + "}" * 50_000
    with pytest.raises(InvalidRequestError, match=r"nested too deeply|not JSON"):
        GrammarLimits(max_bytes=len(text)).check("json_schema", text)


def test_the_reader_options_set_the_limits() -> None:
    config = ReaderConfig(model_name="m", device="cpu", max_grammar_bytes=10, grammar_compile_timeout_s=2.5)
    limits = GrammarLimits.of(config)
    assert (limits.max_bytes, limits.max_repetition, limits.compile_timeout_s) == (10, 1000, 2.5)
    assert GrammarLimits.of(ReaderConfig(model_name="m", device="cpu")).compile_timeout_s == DEFAULT_COMPILE_TIMEOUT_S
