"""Bounds on what a request's grammar may ask of the compiler, checked before anything is compiled.

Compiling a grammar costs time in proportion to the bounds it repeats things by: a JSON schema's ``maxLength``
(measured: about a second and a half for 1000 on these 2 cores), ``maxItems`` and friends, a regex's ``{m,n}``.
xgrammar cannot be interrupted once it has started, so a bound too large would hold the compile thread for
minutes. These checks refuse such a grammar with a 400 that names the setting, at the cost of a JSON parse and a
walk of the schema. What they let through still compiles off the engine thread within the reader's
``grammar_compile_timeout_s`` (see :mod:`liftoff.backends.grammar`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError

# The reader options these limits read (honoured by every backend that does structured generation).
GRAMMAR_OPTIONS = frozenset({"max_grammar_bytes", "max_grammar_repetition", "grammar_compile_timeout_s"})
DEFAULT_MAX_BYTES = 65_536
DEFAULT_MAX_REPETITION = 1000
DEFAULT_COMPILE_TIMEOUT_S = 30.0

# JSON-schema keywords whose value a compiled grammar repeats a rule by.
_REPEATING = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties")
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """A reader's grammar bounds (reader options ``max_grammar_bytes``, ``max_grammar_repetition``,
    ``grammar_compile_timeout_s``)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_repetition: int = DEFAULT_MAX_REPETITION
    compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S

    @classmethod
    def of(cls, config: ReaderConfig) -> GrammarLimits:
        """The limits a reader's configuration sets (the defaults where it sets none)."""
        return cls(
            config.max_grammar_bytes or DEFAULT_MAX_BYTES,
            config.max_grammar_repetition or DEFAULT_MAX_REPETITION,
            config.grammar_compile_timeout_s or DEFAULT_COMPILE_TIMEOUT_S,
        )

    def check(self, kind: str, text: str) -> None:
        """A 400 when the grammar (``regex_string`` or ``json_schema`` text) is over a bound."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise InvalidRequestError(
                f"{kind} is {size} bytes, more than this reader's max_grammar_bytes ({self.max_bytes})", param=kind
            )
        if kind == "regex_string":
            self._check_regex(kind, text)
        else:
            self._check_schema(kind, text)

    def _refuse(self, kind: str, where: str, value: int) -> None:
        raise InvalidRequestError(
            f"{kind}: {where} is {value}, more than this reader's max_grammar_repetition ({self.max_repetition}); "
            "compiling it would take too long: lower the bound",
            param=kind,
        )

    def _check_regex(self, kind: str, pattern: str, where: str = "a {m,n} repetition") -> None:
        for match in _QUANTIFIER.finditer(pattern):
            for bound in match.groups():
                if bound and int(bound) > self.max_repetition:
                    self._refuse(kind, where, int(bound))

    def _check_schema(self, kind: str, text: str) -> None:
        try:
            schema = json.loads(text)
        except RecursionError:
            raise InvalidRequestError(f"{kind} is nested too deeply", param=kind) from None
        except ValueError as exc:
            raise InvalidRequestError(f"{kind} is not JSON: {exc}", param=kind) from None
        for node in _nodes(schema):
            for key in _REPEATING:
                value = node.get(key)
                if isinstance(value, int) and value > self.max_repetition:
                    self._refuse(kind, key, value)
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                self._check_regex(kind, pattern, "a {m,n} repetition in a pattern")


def _nodes(schema: Any) -> list[dict[str, Any]]:
    """Every object in a JSON document, walked without recursion (a schema may be nested deeply)."""
    found: list[dict[str, Any]] = []
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
