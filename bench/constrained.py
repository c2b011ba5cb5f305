"""Structured generation cost: constrained JSON output against unconstrained output, and grammar compile times.

In process, with the bundled SmolLM2-135M-Instruct, for each backend (``llamacpp`` on the Q4_1 GGUF,
``transformers`` on its dequantized copy, ``auto`` dtype), driven the way the reader's engine drives it (admit,
then ``step()`` until every sequence has finished):

* ``constrained``: the chat prompts ask for a JSON description of a topic, and the requests carry a JSON schema
  (greedy, so runs repeat exactly). Each sequence ends when its grammar is complete.
* ``unconstrained``: the same prompts with no schema, each made to produce exactly as many tokens as its
  constrained run did (``min_new_tokens = max_new_tokens``), so both runs do the same model work and the ratio
  is the cost of the grammar (masking, matcher updates, the sampler's slower path for constrained rows).

Concurrency 1 runs the prompts one after the other; concurrency N admits N at once. Rates are output tokens per
second over the whole run, prefill included; the two modes alternate, ``--repeats`` times each, and the best run
of each counts (the machine may be shared: the best is the least disturbed). Grammar compile times are measured
on a fresh :class:`~liftoff.backends.grammar.Grammars` of the llama.cpp model's vocabulary: the first
constrained request's set-up (vocabulary table and compiler), then per grammar the first compilation, a cached
lookup and a new matcher (what admission costs).

Run it from the repository root (takes about five minutes on two cores)::

    .venv/bin/python bench/constrained.py
    .venv/bin/python bench/constrained.py --backends llamacpp --concurrency 1,8,16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

from liftoff.backends.base import BackendContext, GenerativeBackend
from liftoff.backends.grammar import GrammarKind, Grammars, Vocabulary
from liftoff.backends.resolve import resolve_model
from liftoff.config.models import ReaderConfig
from liftoff.core.types import GenerationParams

MODEL = "smollm2-135m-instruct"
TOPICS = [
    "the printing press",
    "honey bees",
    "the water cycle",
    "the game of chess",
    "volcanoes",
    "sourdough bread",
    "the first moon landing",
    "whale migration",
    "lighthouses",
    "the bicycle",
    "coral reefs",
    "the violin",
    "glaciers",
    "the silk road",
    "solar eclipses",
    "origami",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "summary": {"type": "string", "maxLength": 240},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 3, "maxItems": 3},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 10},
        "for_children": {"type": "boolean"},
    },
    "required": ["title", "summary", "keywords", "difficulty", "for_children"],
}
NESTED = {
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
            "required": ["name", "born"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "authors": {"type": "array", "items": {"$ref": "#/$defs/person"}},
        "published": {"type": "string", "format": "date"},
        "kind": {"enum": ["book", "article", "thesis"]},
        "pages": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
    },
    "required": ["title", "authors", "kind"],
    "additionalProperties": False,
}
GRAMMARS: list[tuple[str, GrammarKind, str]] = [
    ("json_object: {type: object}", "json_schema", '{"type": "object"}'),
    ("bench schema (5 fields, bounds)", "json_schema", json.dumps(SCHEMA)),
    ("nested: $defs, $ref, anyOf, enum, date", "json_schema", json.dumps(NESTED)),
    ("regex: phone number", "regex_string", r"\+\d{1,3} \(\d{3}\) \d{3}-\d{4}"),
    ("regex: e-mail-like", "regex_string", r"[a-z][a-z0-9._]{0,20}@[a-z]{2,12}\.(com|org|net|fr)"),
]


@dataclass
class Run:
    """One timed pass over the prompts: wall time and output tokens per request."""

    seconds: float
    tokens: dict[str, int]

    @property
    def rate(self) -> float:
        return sum(self.tokens.values()) / self.seconds


def prompt(topic: str) -> str:
    return (
        f"Describe {topic} as a JSON object with a title, a short summary, three keywords, a difficulty from 1 to "
        "10 and whether it suits children."
    )


def drive(backend: GenerativeBackend, requests: dict[str, GenerationParams], topics: dict[str, str], width: int) -> Run:
    """Serve ``requests`` ``width`` at a time (each group one continuous batch); tokens made by each."""
    tokens: dict[str, int] = {}
    items = list(requests.items())
    started = time.perf_counter()
    for start in range(0, len(items), width):
        for request_id, params in items[start : start + width]:
            backend.admit(request_id, prompt(topics[request_id]), params)
        while backend.active():
            for out in backend.step():
                if out.error is not None:
                    raise RuntimeError(f"{out.request_id}: {out.error.message}")
                if out.finish_reason is not None:
                    tokens[out.request_id] = out.completion_tokens
    return Run(time.perf_counter() - started, tokens)


def compare(backend: GenerativeBackend, width: int, count: int, repeats: int) -> tuple[Run, Run]:
    """Best constrained and best unconstrained run over ``count`` prompts, ``width`` at a time."""
    topics = {f"r{i}": TOPICS[i % len(TOPICS)] for i in range(count)}
    schema = json.dumps(SCHEMA)
    constrained = {
        rid: GenerationParams(max_new_tokens=300, json_schema=schema, use_chat_template=True) for rid in topics
    }
    drive(backend, constrained, topics, width)  # warm-up: compiles the grammar, fills the caches
    runs_c: list[Run] = []
    runs_u: list[Run] = []
    for _ in range(repeats):
        runs_c.append(drive(backend, constrained, topics, width))
        exact = {
            rid: GenerationParams(max_new_tokens=n, min_new_tokens=n, use_chat_template=True)
            for rid, n in runs_c[-1].tokens.items()
        }
        runs_u.append(drive(backend, exact, topics, width))
        assert runs_u[-1].tokens == runs_c[-1].tokens, "the unconstrained run must make the same tokens"
    return max(runs_c, key=lambda run: run.rate), max(runs_u, key=lambda run: run.rate)


def load(name: str, repository: Path, capacity: int, threads: int) -> GenerativeBackend:
    options: dict[str, object] = {"n_threads": threads}
    if name == "transformers":
        from liftoff.backends.transformers.backend import TransformersBackend  # torch only when asked for

        backend_class: type[GenerativeBackend] = TransformersBackend
    else:
        from liftoff.backends.llamacpp.backend import LlamaCppBackend

        backend_class = LlamaCppBackend
    config = ReaderConfig(
        model_name=MODEL, device="cpu", max_batch_size=capacity, max_sequence_length=1024, backend_options=options
    )
    model = resolve_model(MODEL, repository)
    backend = backend_class(config, BackendContext(repository_path=repository, model=model))
    backend.load(lambda fraction: None)
    return backend


def compile_times(repeats: int) -> list[tuple[str, float, float, float]]:
    """Per grammar: first compile, cached lookup, new matcher (ms); the set-up first, as its own row."""
    from liftoff.backends.llamacpp.native import NativeModel

    model = NativeModel(resolve_model(MODEL, Path("/tmp")).path, lambda fraction: None)
    try:
        grammars = Grammars(lambda: Vocabulary(model.pieces), model.eog, model.n_vocab)
        setup = _ms(partial(grammars.compiled, "regex_string", "x"))
        rows = [("set-up: vocabulary table and compiler (+ regex 'x')", setup, 0.0, 0.0)]
        for label, kind, text in GRAMMARS:
            first = _ms(partial(grammars.compiled, kind, text))
            cached = statistics.median(_ms(partial(grammars.compiled, kind, text)) for _ in range(repeats))
            params = (
                GenerationParams(regex_string=text) if kind == "regex_string" else GenerationParams(json_schema=text)
            )
            matcher = statistics.median(_ms(partial(grammars.constraint, params)) for _ in range(repeats))
            rows.append((label, first, cached, matcher))
    finally:
        model.close()
    return rows


def _ms(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompts", type=int, default=8, help="requests per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repository-path", type=Path, default=Path.home() / ".cache" / "liftoff" / "bench-repo")
    args = parser.parse_args(argv)
    widths = [int(value) for value in args.concurrency.split(",")]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"time: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    started = time.perf_counter()
    import xgrammar  # noqa: F401 (timed: what a reader's first constrained request pays)

    print(f"import xgrammar (with torch): {time.perf_counter() - started:.2f} s (xgrammar {version('xgrammar')})\n")
    print("| backend | concurrency | tokens | unconstrained tok/s | constrained JSON tok/s | ratio |")
    print("|---|--:|--:|--:|--:|--:|")
    for name in args.backends.split(","):
        backend = load(name, args.repository_path, max(widths), args.threads)
        try:
            for width in widths:
                constrained, plain = compare(backend, width, args.prompts, args.repeats)
                tokens = sum(constrained.tokens.values())
                ratio = constrained.rate / plain.rate
                print(
                    f"| {name} | {width} | {tokens} | {plain.rate:.1f} | {constrained.rate:.1f} | {ratio:.2f} |",
                    flush=True,
                )
        finally:
            backend.close()
    print("\n| grammar (SmolLM2 vocabulary, 49,152 tokens) | first compile ms | cached µs | new matcher µs |")
    print("|---|--:|--:|--:|")
    for label, first, cached, matcher in compile_times(10):
        print(f"| {label} | {first:.1f} | {1e3 * cached:.1f} | {1e3 * matcher:.1f} |")


if __name__ == "__main__":
    main()
