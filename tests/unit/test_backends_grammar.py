"""``liftoff.backends.grammar`` and the sampler's use of it, on a made-up byte vocabulary (no model needed).

The vocabulary: the 256 single bytes (ids 0-255), then ``ab`` (256), ``hello`` (257) and ``é`` as two bytes
(258), a special token (259, no text), the end-of-sequence token (260); the logits rows are wider (264), as a
model's padded output layer can be.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("xgrammar")

from liftoff.backends.grammar import Grammars, TokenConstraint, Vocabulary, _token_bits, requested_grammar
from liftoff.backends.sampling import SamplerState, finish_reason, sample
from liftoff.core.errors import InvalidRequestError, NotSupportedError
from liftoff.core.types import FinishReason, GenerationParams

PIECES = [bytes([i]) for i in range(256)] + [b"ab", b"hello", "é".encode(), b"", b""]
AB, HELLO, E_ACUTE, SPECIAL, EOS = 256, 257, 258, 259, 260
WIDTH = 264
EOS_IDS = np.array([EOS], dtype=np.int64)


def make_grammars(capacity: int = 8) -> Grammars:
    return Grammars(lambda: Vocabulary(PIECES), [EOS], len(PIECES), capacity=capacity)


def constraint_of(grammars: Grammars, **fields: object) -> TokenConstraint:
    found = grammars.constraint(GenerationParams(**fields))  # type: ignore[arg-type]
    assert found is not None
    return found


def allowed(constraint: TokenConstraint) -> set[int]:
    row = np.zeros(WIDTH, dtype=np.float32)
    constraint.mask(row)
    return {int(i) for i in np.flatnonzero(np.isfinite(row))}


def text_of(tokens: list[int]) -> str:
    return b"".join(PIECES[token] for token in tokens).decode()


# ---- which grammar a request asks for ------------------------------------------------------------------------------


def test_the_regex_wins_over_the_schema_and_no_fields_mean_no_grammar() -> None:
    both = GenerationParams(regex_string="a+", json_schema='{"type": "object"}')
    assert requested_grammar(both) == ("regex_string", "a+")
    assert requested_grammar(GenerationParams(json_schema="{}")) == ("json_schema", "{}")
    assert requested_grammar(GenerationParams()) is None
    assert requested_grammar(GenerationParams(regex_string="a", constrained_decoding_backend="XGrammar")) is not None


@pytest.mark.parametrize("engine", ["outlines", "lmfe", "none"])
def test_other_engines_are_a_400_naming_the_one_available(engine: str) -> None:
    with pytest.raises(NotSupportedError) as caught:
        requested_grammar(GenerationParams(regex_string="a", constrained_decoding_backend=engine))
    assert caught.value.status == 400
    assert caught.value.param == "constrained_decoding_backend"
    assert repr(engine) in caught.value.message
    assert "this server has: xgrammar" in caught.value.message


# ---- compiling and the cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"regex_string": "(ab"}, "regex_string", "The parenthesis is not closed"),
        ({"regex_string": "a(?=b)"}, "regex_string", "Lookahead is not supported"),
        ({"regex_string": r"(a)\1"}, "regex_string", "Backreference is not supported"),
        ({"json_schema": '{"type": "frob"}'}, "json_schema", 'Unsupported type "frob"'),
        ({"json_schema": "false"}, "json_schema", "cannot accept any value"),
        ({"json_schema": '{"type": "string", "minLength": 5, "maxLength": 3}'}, "json_schema", "greater than"),
    ],
)
def test_what_xgrammar_cannot_compile_is_a_400_saying_why(fields: dict[str, str], param: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        make_grammars().constraint(GenerationParams(**fields))  # type: ignore[arg-type]
    error = caught.value
    assert (error.status, error.param) == (400, param)
    assert words in error.message
    assert error.message.startswith(f"{param} is not a")
    assert ".cc:" not in error.message  # xgrammar's source location is left out


def test_compiled_grammars_are_cached_least_recently_used_first_out() -> None:
    grammars = make_grammars(capacity=2)
    first = grammars.compiled("regex_string", "a")
    grammars.compiled("json_schema", "{}")
    assert (grammars.hits, grammars.misses, len(grammars)) == (0, 2, 2)
    assert grammars.compiled("regex_string", "a") is first
    assert grammars.hits == 1
    grammars.compiled("regex_string", "b")  # evicts the schema, used least recently
    assert len(grammars) == 2
    grammars.compiled("json_schema", "{}")
    assert (grammars.hits, grammars.misses) == (1, 4)
    assert grammars.compiled("regex_string", "a") is not first  # evicted by the schema in turn: compiled again
    assert grammars.compile_seconds > 0


def test_the_same_text_as_a_regex_and_as_a_schema_are_two_grammars() -> None:
    grammars = make_grammars()
    grammars.compiled("regex_string", "true")
    grammars.compiled("json_schema", "true")
    assert (grammars.hits, grammars.misses) == (0, 2)


# ---- the constraint ------------------------------------------------------------------------------------------------


def test_the_mask_allows_exactly_what_the_grammar_can_take_next() -> None:
    constraint = constraint_of(make_grammars(), regex_string="ab|hello|é")
    assert allowed(constraint) == {ord("a"), ord("h"), AB, HELLO, E_ACUTE, 0xC3}  # 0xC3: é's first byte
    assert not constraint.complete
    constraint.accept(ord("h"))
    assert allowed(constraint) == {ord("e")}
    for letter in "ello":
        constraint.accept(ord(letter))
    assert constraint.complete
    assert allowed(constraint) == {EOS}


def test_special_and_padding_tokens_are_never_allowed() -> None:
    constraint = constraint_of(make_grammars(), regex_string=".*")
    tokens = allowed(constraint)
    assert SPECIAL not in tokens
    assert not tokens & set(range(len(PIECES), WIDTH))
    assert {EOS, AB, HELLO, ord("z")} <= tokens


def test_json_output_is_compact_and_gets_no_control_characters() -> None:
    grammars = make_grammars()
    controls = set(range(0x20))
    bounded = constraint_of(grammars, json_schema='{"type": "string", "maxLength": 5}')
    bounded.accept(ord('"'))
    assert ord("x") in allowed(bounded)
    assert not allowed(bounded) & controls  # xgrammar 0.2.8 alone would allow them in a length-bounded string
    assert constraint_of(grammars, regex_string="[\x01-\x03]") is not None
    assert allowed(constraint_of(grammars, regex_string="[\x01-\x03]")) == {1, 2, 3}  # regexes are not narrowed
    compact = constraint_of(grammars, json_schema='{"type": "array", "items": {"type": "integer"}}')
    compact.accept(ord("["))
    compact.accept(ord("1"))
    assert allowed(compact) == {ord(digit) for digit in "0123456789"} | {ord(","), ord("]")}
    compact.accept(ord(","))
    assert allowed(compact) == {ord(" ")}  # the separator is ", ", nothing else


def test_sampled_json_strings_with_length_bounds_parse() -> None:
    grammars = make_grammars()
    schema = '{"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 4}, "maxItems": 3}'
    for seed in range(20):
        params = GenerationParams(temperature=1.0, top_k=0, seed=seed)
        state = SamplerState(params, [1], constraint=constraint_of(grammars, json_schema=schema))
        value = json.loads(text_of(decode(state, 300)))
        assert isinstance(value, list)
        assert len(value) <= 3
        assert all(1 <= len(item) <= 4 for item in value)


def test_a_token_the_mask_forbids_is_refused_loudly() -> None:
    constraint = constraint_of(make_grammars(), regex_string="a")
    with pytest.raises(RuntimeError, match="xgrammar refused token 98"):
        constraint.accept(ord("b"))


def test_token_bits_follow_xgrammars_layout() -> None:
    words = _token_bits(40, exclude=[3, 33])
    assert words.dtype == np.uint32
    assert words.tolist() == [0xFFFFFFFF & ~(1 << 3), 0xFF & ~(1 << 1)]


# ---- the sampler with a constraint ---------------------------------------------------------------------------------


def decode(state: SamplerState, steps: int, logits: np.ndarray | None = None) -> list[int]:
    """Sample ``steps`` tokens for ``state`` (stopping at EOS or a complete grammar) from fixed or random logits."""
    rng = np.random.default_rng(0)
    for _ in range(steps):
        row = logits if logits is not None else rng.normal(size=WIDTH).astype(np.float32)
        [token] = sample(row[None, :].copy(), [state], EOS_IDS)
        if token == EOS or state.grammar_complete:
            break
    return state.generated


def test_sampled_tokens_follow_the_grammar_whatever_the_logits_favour() -> None:
    grammars = make_grammars()
    schema = json.dumps({"type": "object", "properties": {"k": {"enum": ["ab", "hello"]}}, "required": ["k"]})
    favour_z = np.zeros(WIDTH, dtype=np.float32)
    favour_z[ord("z")] = 100.0
    for seed in range(5):
        params = GenerationParams(json_schema=schema, temperature=1.0, top_k=0, seed=seed)
        state = SamplerState(params, [1], constraint=constraint_of(grammars, json_schema=schema))
        assert not state.plain
        tokens = decode(state, 200)
        assert state.grammar_complete
        assert json.loads(text_of(tokens))["k"] in {"ab", "hello"}
    greedy = SamplerState(GenerationParams(), [1], constraint=constraint_of(grammars, regex_string="[a-c]{3}"))
    assert text_of(decode(greedy, 10, favour_z)) == "aaa"  # "z" is masked; the first of the equal rest wins


def test_constrained_and_plain_rows_in_one_call() -> None:
    grammars = make_grammars()
    logits = np.zeros((2, WIDTH), dtype=np.float32)
    logits[:, ord("q")] = 5.0
    logits[:, HELLO] = 1.0
    plain = SamplerState(GenerationParams(), [1])
    constrained = SamplerState(GenerationParams(), [1], constraint=constraint_of(grammars, regex_string="hello"))
    assert sample(logits.copy(), [plain, constrained], EOS_IDS) == [ord("q"), HELLO]
    assert constrained.grammar_complete
    assert finish_reason(constrained, budget=100) == FinishReason.STOP
    assert finish_reason(plain, budget=1) == FinishReason.LENGTH
    assert finish_reason(plain, budget=2) is None


def test_the_end_of_sequence_hold_gives_way_to_a_complete_grammar() -> None:
    grammars = make_grammars()
    params = GenerationParams(min_new_tokens=10, ignore_eos=True)
    state = SamplerState(params, [1], constraint=constraint_of(grammars, regex_string="a|ab"))
    favour_eos = np.zeros(WIDTH, dtype=np.float32)
    favour_eos[EOS] = 100.0
    assert sample(favour_eos[None, :].copy(), [state], EOS_IDS) in ([ord("a")], [AB])  # EOS held: not complete yet
    if state.generated == [ord("a")]:
        assert not state.grammar_complete  # "ab" may still come: the hold keeps the sequence going
        assert sample(favour_eos[None, :].copy(), [state], EOS_IDS) == [ord("b")]
    assert state.grammar_complete
    assert sample(favour_eos[None, :].copy(), [state], EOS_IDS) == [EOS]  # only EOS is left: the hold is lifted


def test_the_no_repeat_ban_gives_way_when_the_grammar_allows_nothing_else() -> None:
    grammars = make_grammars()
    params = GenerationParams(no_repeat_ngram_size=1)
    state = SamplerState(params, [1], constraint=constraint_of(grammars, regex_string="x{4}"))
    assert text_of(decode(state, 10)) == "xxxx"
    free = SamplerState(params, [1], constraint=constraint_of(grammars, regex_string="[xy]{4}"))
    text = text_of(decode(free, 10))
    assert re.fullmatch("[xy]{4}", text)
    assert text[0] != text[1]  # the ban holds where the grammar leaves a choice
