"""Bounds on every number a client may send, in one place.

Python integers have no upper bound, so a field without one lets a single request carry a value that nothing
downstream can hold (``max_new_tokens: 18446744073709551621`` could not be encoded into a broker frame and took the
reader's link down). Every numeric field of every surface is therefore declared with a range from here, and every
float refuses ``NaN`` and infinities. A value out of range is a 400 that names the field and the range
(``liftoff.gateway.errors``); docs/api.md ("Limits and errors") lists them.

The bounds are generous: they are far above anything a model can use (a context of a million tokens, a top-k
larger than any vocabulary), so they refuse only nonsense, never a real request.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict

MAX_TOKENS = 1 << 20  # max_new_tokens, min_new_tokens, max_tokens, prompt_max_tokens: above any context length
MAX_TOP_K = 1 << 20  # above any vocabulary size
MAX_TEMPERATURE = 100.0  # native API (OpenAI keeps its own 0 to 2)
MAX_OPENAI_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 100.0
MAX_NO_REPEAT_NGRAM = 32  # n-grams the sampler indexes per sequence: memory grows with it
MAX_CHOICES = 128  # OpenAI n (the total also counts against max_user_batch_size)
MAX_LOGPROBS = 20  # OpenAI's own limit of top_logprobs
SEED_MIN = -(1 << 63)  # OpenAI seed: any 64-bit integer (negative ones too, as vLLM takes them)
SEED_MAX = (1 << 64) - 1
MAX_TOKEN_ID = (1 << 31) - 1  # token ids of /detokenize
MAX_DETOKENIZE_TOKENS = 1 << 17  # tokens in one /detokenize body
MAX_STOP_CHARS = 1024  # characters of one stop string
MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
MAX_RESULTS = 1 << 20  # rerank top_n, embedding dimensions
MAX_CONVERSATIONS = 1000  # conversations in one /chat_template body (as max_user_batch_size's default)

# Strict types (a string where a number belongs is an error, not a coercion) and finite floats only.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def describe_range(metadata: list[Any]) -> str | None:
    """The allowed range of a field, in words, from its pydantic constraints (``1 to 1048576``, ``at least 0``)."""
    low = high = None
    low_open = high_open = False
    for item in metadata:
        for name, is_open in (("ge", False), ("gt", True)):
            if getattr(item, name, None) is not None:
                low, low_open = getattr(item, name), is_open
        for name, is_open in (("le", False), ("lt", True)):
            if getattr(item, name, None) is not None:
                high, high_open = getattr(item, name), is_open
    if low is None and high is None:
        return None
    if high is None:
        return f"{'more than' if low_open else 'at least'} {_number(low)}"
    if low is None:
        return f"{'less than' if high_open else 'at most'} {_number(high)}"
    return (
        f"{'more than ' if low_open else 'from '}{_number(low)} to {_number(high)}{' (excluded)' if high_open else ''}"
    )


def _number(value: Any) -> str:
    """``100`` for 100.0: bounds read as the documentation writes them."""
    return f"{value:g}" if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)
