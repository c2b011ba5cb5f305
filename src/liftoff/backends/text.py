"""Text helpers shared by backends: prompt fitting, streaming UTF-8 decoding, chat-template rendering."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from liftoff.core.errors import ContextLengthExceededError, InvalidRequestError
from liftoff.core.types import GenerationParams


def fit_prompt(ids: Sequence[int], params: GenerationParams, context_length: int | None) -> tuple[list[int], int]:
    """Apply ``prompt_max_tokens`` (keeping the end of the prompt) and the context length.

    Returns the prompt to run and how many tokens may be generated. A prompt that leaves no room for one new
    token is refused with a message that gives both numbers.
    """
    tokens = list(ids)
    if params.prompt_max_tokens is not None and len(tokens) > params.prompt_max_tokens:
        tokens = tokens[len(tokens) - params.prompt_max_tokens :]
    budget = params.max_new_tokens
    if context_length is not None:
        if len(tokens) >= context_length:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens but this reader's max_sequence_length is {context_length} "
                "(prompt and output together); shorten the prompt or set prompt_max_tokens"
            )
        budget = min(budget, context_length - len(tokens))
    return tokens, budget


class Utf8Stream:
    """Decode a stream of byte pieces into text without ever splitting a multi-byte character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> str:
        """Text completed by ``data``; an incomplete character waits for the next piece."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """Whatever is left at the end of the sequence (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def _raise(message: str) -> None:
    raise InvalidRequestError(f"the chat template refused the conversation: {message}")


def render_chat_template(
    template: str,
    conversation: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a Hugging Face-style Jinja chat template, sandboxed, as ``transformers`` does."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise InvalidRequestError(f"the chat template failed: {exc}") from None


def user_turn(text: str) -> list[dict[str, Any]]:
    """``use_chat_template``: the prompt as a single user message."""
    return [{"role": "user", "content": text}]


def conversation(text: str, messages: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """What a request gives the chat template: its ``messages`` when it has some, else ``text`` as one user turn."""
    if messages:
        return [{"role": role, "content": content} for role, content in messages]
    return user_turn(text)
