"""Structured generation on both generation backends: JSON-schema and regex constraints (xgrammar).

The transformers backend runs the tiny random Llama (SmolLM2's tokenizer): unconstrained, it writes gibberish, so
every valid output here is the grammar's doing. The llama.cpp backend runs the bundled SmolLM2 GGUF, whose
vocabulary the grammar reads as raw token bytes. Requests sample (temperature 1, no top-k) over many seeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("xgrammar")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

from liftoff.backends.base import BackendContext, GenerativeBackend
from liftoff.backends.grammar import Grammars, huggingface_vocabulary
from liftoff.backends.llamacpp.backend import LlamaCppBackend
from liftoff.backends.resolve import ResolvedModel, resolve_model
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import LiftoffError
from liftoff.core.types import FinishReason, GenerationParams
from tests.models.runs import Run, drain

CAPACITY = 8
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "ok"],
}
PROMPTS = [
    "Describe a person as JSON.",
    "Once upon a time",
    "The weather today is",
    "List three colours:",
    "Write a short poem about the sea.",
    "What is 2 + 2?",
    "Translate 'cat' into French.",
    "Give me a JSON object describing a person named Alice who is 30 and has a dog.",
]
# Non-ASCII alternatives: the grammar works on bytes, the output must still decode to these characters.
WORDS = r"(café|naïve|日本語|emoji 😀)( (café|naïve|日本語|emoji 😀)){0,3}\."
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


def check_person(value: Any) -> None:
    """``value`` is valid under :data:`PERSON` (xgrammar's strict mode: no properties beyond the schema's)."""
    assert isinstance(value, dict)
    assert set(PERSON["required"]) <= set(value) <= set(PERSON["properties"])
    assert isinstance(value["name"], str)
    assert len(value["name"]) <= 12
    assert isinstance(value["age"], int)
    assert not isinstance(value["age"], bool)
    assert 0 <= value["age"] <= 120
    assert value["pet"] in ("cat", "dog", "none")
    assert isinstance(value["ok"], bool)
    tags = value.get("tags", [])
    assert isinstance(tags, list)
    assert len(tags) <= 3
    assert all(isinstance(tag, str) and len(tag) <= 6 for tag in tags)


@pytest.fixture(scope="module")
def transformers_backend(tiny_llama: Path) -> Iterator[TransformersBackend]:
    options = {"dtype": "float32", "n_threads": 1, "prefix_cache": False}
    config = ReaderConfig(model_name="tiny", device="cpu", max_batch_size=CAPACITY, backend_options=options)
    context = BackendContext(repository_path=tiny_llama.parent, model=ResolvedModel("tiny", tiny_llama, "hf"))
    backend = TransformersBackend(config, context)
    backend.load(lambda fraction: None)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def llamacpp_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    model = "smollm2-135m-instruct"
    resolved = resolve_model(model, tmp_path_factory.mktemp("repository"))
    options = {"n_threads": 1, "prefix_cache": False}  # exact numerics: batched runs match runs alone
    config = ReaderConfig(
        model_name=model, device="cpu", max_batch_size=CAPACITY, max_sequence_length=512, backend_options=options
    )
    backend = LlamaCppBackend(config, BackendContext(model=resolved))
    backend.load(lambda fraction: None)
    yield backend
    backend.close()


@pytest.fixture(params=["transformers", "llamacpp"])
def backend(request: pytest.FixtureRequest) -> Iterator[GenerativeBackend]:
    found: GenerativeBackend = request.getfixturevalue(f"{request.param}_backend")
    yield found
    assert found.active() == 0, "a test left sequences in the backend"


def grammars_of(backend: GenerativeBackend) -> Grammars:
    assert isinstance(backend, TransformersBackend | LlamaCppBackend)
    assert backend.grammars is not None
    return backend.grammars


def run_all(backend: GenerativeBackend, requests: dict[str, tuple[str, GenerationParams]]) -> dict[str, Run]:
    """Every request, admitted ``CAPACITY`` at a time (each group decodes as one continuous batch)."""
    runs: dict[str, Run] = {}
    items = list(requests.items())
    for start in range(0, len(items), CAPACITY):
        for request_id, (text, params) in items[start : start + CAPACITY]:
            backend.admit(request_id, text, params)
        drain(backend, runs)
    return runs


def sampled(seed: int, max_new_tokens: int = 256, **fields: Any) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, seed=seed, **fields)


def finished_by_grammar(run: Run) -> str:
    """The text of a run that ended with ``stop`` before its token budget."""
    assert run.final is not None
    assert run.reason == FinishReason.STOP, run.text
    return run.text


# ---- outputs follow the grammar ------------------------------------------------------------------------------------


def test_json_schema_outputs_parse_and_validate(backend: GenerativeBackend) -> None:
    schema = json.dumps(PERSON)
    requests = {f"{seed}": (PROMPTS[seed % len(PROMPTS)], sampled(seed, json_schema=schema)) for seed in range(16)}
    for run in run_all(backend, requests).values():
        check_person(json.loads(finished_by_grammar(run)))


def test_regex_outputs_match_in_full(backend: GenerativeBackend) -> None:
    requests = {
        f"{name}{seed}": (PROMPTS[seed], sampled(seed, 64, regex_string=regex))
        for name, regex in (("words", WORDS), ("phone", PHONE))
        for seed in range(4)
    }
    runs = run_all(backend, requests)
    for request_id, run in runs.items():
        regex = WORDS if request_id.startswith("words") else PHONE
        assert re.fullmatch(regex, finished_by_grammar(run)), run.text


def test_the_model_may_end_where_the_grammar_may_end(backend: GenerativeBackend) -> None:
    regex = "(the|a) (cat|dog)s?"  # after "cat" or "dog": an "s", or the end of sequence
    requests = {f"{seed}": (PROMPTS[seed], sampled(seed, 32, regex_string=regex)) for seed in range(8)}
    texts = [finished_by_grammar(run) for run in run_all(backend, requests).values()]
    assert all(re.fullmatch(regex, text) for text in texts), texts
    assert any(not text.endswith("s") for text in texts), texts  # ended by the model's end-of-sequence token


def test_the_regex_wins_over_the_schema(backend: GenerativeBackend) -> None:
    params = sampled(0, 32, regex_string=PHONE, json_schema=json.dumps(PERSON))
    run = run_all(backend, {"both": (PROMPTS[0], params)})["both"]
    assert re.fullmatch(PHONE, finished_by_grammar(run))


def test_a_complete_grammar_ends_the_sequence_before_its_budget(backend: GenerativeBackend) -> None:
    params = GenerationParams(max_new_tokens=100, regex_string="(yes|no)", min_new_tokens=50, ignore_eos=True)
    run = run_all(backend, {"short": (PROMPTS[5], params)})["short"]
    assert finished_by_grammar(run) in ("yes", "no")
    assert run.final is not None
    assert run.final.completion_tokens <= 3


# ---- constrained and unconstrained together ------------------------------------------------------------------------


def test_unconstrained_output_is_unchanged_by_constrained_neighbours(backend: GenerativeBackend) -> None:
    greedy = GenerationParams(max_new_tokens=24)
    alone = run_all(backend, {"plain": (PROMPTS[1], greedy)})["plain"].text
    requests = {
        "plain": (PROMPTS[1], greedy),
        "json": (PROMPTS[0], sampled(1, json_schema=json.dumps(PERSON))),
        "regex": (PROMPTS[2], GenerationParams(max_new_tokens=32, regex_string=PHONE)),
        "sampled": (PROMPTS[3], sampled(2, 24)),
    }
    runs = run_all(backend, requests)
    assert runs["plain"].text == alone
    check_person(json.loads(finished_by_grammar(runs["json"])))
    assert re.fullmatch(PHONE, finished_by_grammar(runs["regex"]))


# ---- refusals and the cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"regex_string": "(ab"}, "parenthesis is not closed"),
        ({"regex_string": "a(?=b)"}, "Lookahead is not supported"),
        ({"json_schema": '{"type": "frob"}'}, 'Unsupported type "frob"'),
        ({"json_schema": "{}", "constrained_decoding_backend": "outlines"}, "this server has: xgrammar"),
        ({"constrained_decoding_backend": "lmfe"}, "this server has: xgrammar"),
    ],
)
def test_requests_that_cannot_be_constrained_are_400s(
    backend: GenerativeBackend, fields: dict[str, str], words: str
) -> None:
    with pytest.raises(LiftoffError) as caught:
        backend.admit("bad", "hi", GenerationParams(**fields))  # type: ignore[arg-type]
    assert caught.value.status == 400
    assert words in caught.value.message
    assert backend.active() == 0


def test_a_grammar_is_compiled_once_then_taken_from_the_cache(backend: GenerativeBackend) -> None:
    grammars = grammars_of(backend)
    schema = json.dumps({**PERSON, "title": "cache test"})  # a text no other test compiles
    hits, misses = grammars.hits, grammars.misses
    run_all(backend, {"first": (PROMPTS[0], sampled(0, json_schema=schema))})
    assert (grammars.hits, grammars.misses) == (hits, misses + 1)
    runs = run_all(backend, {"second": (PROMPTS[1], sampled(1, json_schema=schema))})
    assert (grammars.hits, grammars.misses) == (hits + 1, misses + 1)
    check_person(json.loads(finished_by_grammar(runs["second"])))


def test_both_backends_see_smollm2s_vocabulary_as_the_same_bytes(
    transformers_backend: TransformersBackend, llamacpp_backend: LlamaCppBackend, tiny_llama: Path
) -> None:
    from transformers import AutoTokenizer

    hf = huggingface_vocabulary(AutoTokenizer.from_pretrained(tiny_llama))
    model = llamacpp_backend._model
    assert model is not None
    assert list(hf.pieces) == model.pieces  # special tokens are b"" in both: the grammar never offers them
    assert hf.pieces[2] == b""  # <|im_end|>
    [hello] = model.tokenize(" hello", add_special=False, parse_special=False)
    assert hf.pieces[hello] == b" hello"  # byte-level BPE's "Ġhello", as the bytes it writes
