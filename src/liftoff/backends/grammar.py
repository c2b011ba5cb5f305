"""Structured generation: JSON-schema and regex constraints on each sequence's next token, with xgrammar.

A request asks for structure with ``regex_string`` or ``json_schema`` (the regex wins when both are set) and may
name the engine with ``constrained_decoding_backend``: xgrammar is the one engine, and the default. Each
generation backend owns one :class:`Grammars` for its model, which keeps the last ``CACHE_SIZE`` compiled
grammars, keyed by kind and text. A grammar is first checked against the reader's limits
(:mod:`liftoff.backends.grammar_limits`), then compiled *before* admission by :meth:`Grammars.preparation`, which
the engine runs on a thread of its own: compiling takes from under a millisecond for a short regex to seconds for
a schema with long bounded strings (docs/benchmarks.md), and the running streams keep stepping meanwhile.
xgrammar releases the GIL while it compiles, on one core, so the engine keeps the other.

A constrained sequence gets a :class:`TokenConstraint` (an xgrammar
matcher and its token bitmask); the shared sampler (:mod:`liftoff.backends.sampling`) has it mask the sequence's
logits row before picking a token and tells it each token picked. When the grammar allows nothing but an
end-of-sequence token the constraint is ``complete`` and the backend finishes the sequence (``stop``).

The grammar sees the model's vocabulary as raw bytes: the bytes each token adds to the output, special tokens
(which the output never shows) as nothing, so xgrammar never offers one. The llama.cpp backend has these bytes
already (its token pieces); the transformers backend takes xgrammar's decoding of the Hugging Face vocabulary.

JSON comes out compact, as ``{"a": 1, "b": [2, 3]}`` (xgrammar without ``any_whitespace``): given free
whitespace, a small model spends its tokens on it (SmolLM2 sampled at temperature 1 filled 256-token budgets with
runs of newlines between the elements). So JSON output never needs a control character, and never gets a token
holding one: JSON allows none inside strings, and xgrammar 0.2.8 lets them into strings that have a
``minLength`` or ``maxLength`` (its length-bounded string rule forgets to exclude them).

xgrammar (and torch, which it imports) is imported on the first constrained request, so a reader that gets none
never loads it; the vocabulary table and the compiler are built then too.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from liftoff.backends.base import Preparation
from liftoff.backends.grammar_limits import GrammarLimits
from liftoff.core.errors import InvalidRequestError, NotSupportedError
from liftoff.core.types import GenerationParams

logger = logging.getLogger(__name__)

ENGINES = ("xgrammar",)
CACHE_SIZE = 64
FIRST_USE_S = 10.0  # the silence the first compilation announces (importing xgrammar holds the GIL at times)
SLOW_COMPILE_S = 0.1  # a compilation this long is logged at INFO: the reader's running streams waited for it
_CONTROL_CHARACTERS = bytes(range(0x20))  # never in compact JSON output
_SOURCE_PREFIX = re.compile(r"^\s*\[[\d:]+\] \S+:\d+: ")  # "[13:31:58] /project/cpp/regex_converter.cc:83: "

GrammarKind = Literal["regex_string", "json_schema"]


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """A model's tokens as xgrammar needs them: each token's output bytes (``b""`` for special tokens)."""

    pieces: Sequence[bytes]
    add_prefix_space: bool = False


def requested_grammar(params: GenerationParams) -> tuple[GrammarKind, str] | None:
    """The grammar a request asks for (the regex wins over the schema), after checking its engine."""
    engine = params.constrained_decoding_backend
    if engine is not None and engine.lower() not in ENGINES:
        raise NotSupportedError(
            f"constrained_decoding_backend {engine!r} is not available; this server has: {', '.join(ENGINES)}",
            param="constrained_decoding_backend",
        )
    if params.regex_string is not None:
        return "regex_string", params.regex_string
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    return None


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:
        raise NotSupportedError(
            f"structured generation needs xgrammar, which this server cannot import ({exc}); install it with "
            "`pip install --no-deps xgrammar==0.2.8` and the project's `structured` extra"
        ) from None
    return xgrammar


def huggingface_vocabulary(tokenizer: Any) -> Vocabulary:
    """The bytes of each token of a Hugging Face tokenizer, special tokens (skipped in the output) as nothing."""
    info = _xgrammar().TokenizerInfo.from_huggingface(tokenizer)
    special = set(tokenizer.all_special_ids)
    special.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    pieces = [b"" if index in special else piece for index, piece in enumerate(info.decoded_vocab)]
    return Vocabulary(pieces, add_prefix_space=bool(info.add_prefix_space))


def _message(exc: Exception) -> str:
    """xgrammar's error text without its source location, on one line."""
    lines = [_SOURCE_PREFIX.sub("", line).strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


class TokenConstraint:
    """One sequence's grammar state: which tokens may come next, moved on by each token the sampler picks."""

    __slots__ = ("_bits", "_matcher", "_narrow", "_nonstop", "_restricted", "_vocab_size", "complete")

    def __init__(
        self,
        matcher: Any,
        nonstop: npt.NDArray[np.uint32],
        vocab_size: int,
        narrow: npt.NDArray[np.uint32] | None = None,
    ) -> None:
        self._matcher = matcher
        self._nonstop = nonstop  # one bit per token of the vocabulary that is not an end-of-sequence token
        self._narrow = narrow  # when given, only the tokens with a bit here may ever come (besides the grammar)
        self._vocab_size = vocab_size
        self._bits = np.empty((1, nonstop.size), dtype=np.int32)
        self._restricted = True
        self.complete = False  # nothing may come next but an end-of-sequence token
        self._refresh()

    def mask(self, row: npt.NDArray[np.float32]) -> None:
        """Set the logits of every token the grammar forbids next to -inf (``row`` is one logits row)."""
        width = min(row.size, self._vocab_size)
        row[width:] = -np.inf  # logits beyond the vocabulary (padding) are never tokens
        if self._restricted:
            allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:width].view(np.bool_)
            np.putmask(row[:width], ~allowed, np.float32(-np.inf))

    def accept(self, token: int) -> None:
        """Move the grammar on by the token the sampler picked (one the mask allowed)."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}, which its own mask allowed")
        self._refresh()

    def _refresh(self) -> None:
        if self._matcher.is_terminated():
            self.complete = True
            return
        self._restricted = bool(self._matcher.fill_next_token_bitmask(self._bits))
        words = self._bits[0].view(np.uint32)
        if self._narrow is not None:
            words &= self._narrow
            self._restricted = True
        self.complete = not np.any(words & self._nonstop)


class Grammars:
    """The compiled grammars of one model's vocabulary: compiler built on first use, an LRU of compiled grammars.

    Used by the engine thread (admission) and the engine's preparation thread (compiling), under one lock that is
    never held while compiling. ``hits`` and ``misses`` count cache lookups; ``compile_seconds`` is the time of
    the last compilation.
    """

    def __init__(
        self,
        vocabulary: Callable[[], Vocabulary],
        stop_ids: Sequence[int],
        vocab_size: int,
        capacity: int = CACHE_SIZE,
        limits: GrammarLimits | None = None,
    ) -> None:
        self.limits = limits or GrammarLimits()
        self._lock = threading.Lock()
        self._vocabulary = vocabulary
        self._stop_ids = sorted({int(token) for token in stop_ids})
        self._vocab_size = vocab_size
        self._capacity = capacity
        self._compiler: Any = None
        self._nonstop = np.zeros(0, dtype=np.uint32)
        self._json_tokens = np.zeros(0, dtype=np.uint32)  # the tokens JSON output may hold
        self._compiled: OrderedDict[tuple[GrammarKind, str], Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.compile_seconds = 0.0

    def __len__(self) -> int:
        return len(self._compiled)

    def preparation(self, params: GenerationParams) -> Preparation | None:
        """The compilation a request needs before admission (None: it asks for no grammar, or it is compiled); a 400
        when the grammar is over the reader's limits."""
        wanted = requested_grammar(params)
        if wanted is None:
            return None
        kind, text = wanted
        self.limits.check(kind, text)
        with self._lock:
            if (kind, text) in self._compiled:
                return None
            first = self._compiler is None  # imports xgrammar (and torch): that holds the GIL for up to a second
        what = f"compiling its {kind}"
        return Preparation(lambda: self.compiled(kind, text), self.limits.compile_timeout_s, what, FIRST_USE_S * first)

    def constraint(self, params: GenerationParams) -> TokenConstraint | None:
        """The constraint of a new sequence, or None when its request asks for none; a 400 when it cannot be had."""
        wanted = requested_grammar(params)
        if wanted is None:
            return None
        kind, text = wanted
        self.limits.check(kind, text)
        compiled = self.compiled(kind, text)
        matcher = _xgrammar().GrammarMatcher(compiled)
        narrow = self._json_tokens if kind == "json_schema" else None
        return TokenConstraint(matcher, self._nonstop, self._vocab_size, narrow)

    def compiled(self, kind: GrammarKind, text: str) -> Any:
        """The compiled grammar of a regex or a JSON schema (text), from the cache when it was compiled lately."""
        key = (kind, text)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self.hits += 1
                self._compiled.move_to_end(key)
                return found
            self.misses += 1
            compiler = self._ensure_compiler()
        started = time.perf_counter()
        try:
            if kind == "regex_string":
                compiled = compiler.compile_regex(text)
            else:
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
        except Exception as exc:  # xgrammar reports unsupported features and syntax errors as RuntimeError
            what = "a regex" if kind == "regex_string" else "a JSON schema"
            raise InvalidRequestError(
                f"{kind} is not {what} that xgrammar can compile: {_message(exc)}", param=kind
            ) from None
        self.compile_seconds = time.perf_counter() - started
        level = logging.INFO if self.compile_seconds >= SLOW_COMPILE_S else logging.DEBUG
        logger.log(level, "compiled a %s grammar of %d characters in %.3f s", kind, len(text), self.compile_seconds)
        with self._lock:
            self._compiled[key] = compiled
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return compiled

    def _ensure_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgrammar()
            vocabulary = self._vocabulary()
            self._vocab_size = max(self._vocab_size, len(vocabulary.pieces))
            info = xgr.TokenizerInfo(
                encoded_vocab=list(vocabulary.pieces),
                vocab_type=xgr.VocabType.RAW,
                vocab_size=self._vocab_size,
                stop_token_ids=self._stop_ids or None,
                add_prefix_space=vocabulary.add_prefix_space,
            )
            self._nonstop = _token_bits(self._vocab_size, exclude=self._stop_ids)
            self._json_tokens = _token_bits(self._vocab_size, exclude=_holding(vocabulary.pieces, _CONTROL_CHARACTERS))
            # One thread: compiling runs beside the engine, which keeps the other cores. The LRU here caches.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


def _holding(pieces: Sequence[bytes], forbidden: bytes) -> list[int]:
    """The tokens whose bytes hold any of ``forbidden``."""
    return [token for token, piece in enumerate(pieces) if piece.translate(None, forbidden) != piece]


def _token_bits(vocab_size: int, *, exclude: Sequence[int]) -> npt.NDArray[np.uint32]:
    """xgrammar's bitmask layout (bit ``i % 32`` of word ``i // 32``) with every token but ``exclude`` set."""
    flags = np.zeros(-(-vocab_size // 32) * 32, dtype=np.bool_)
    flags[:vocab_size] = True
    flags[[token for token in exclude if token < vocab_size]] = False
    words: npt.NDArray[np.uint32] = np.packbits(flags, bitorder="little").view(np.uint32)
    return words
