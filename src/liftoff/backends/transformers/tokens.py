"""The transformers backend's tokenizer services: encoding prompts, tokenize, detokenize and the chat template.

A Hugging Face tokenizer is not safe to use from two threads at once, and the reader calls these services from its
event loop while the engine thread encodes prompts and decodes output, so every use goes through one lock, which
the backend's detokenizer shares (:attr:`HFTokenizer.lock`).
"""

from __future__ import annotations

import threading

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from liftoff.backends.text import conversation
from liftoff.backends.transformers.detok import token_ids
from liftoff.core.errors import InvalidRequestError, NotSupportedError


class HFTokenizer:
    """One model's tokenizer behind a lock, with the operations the backend and the reader's services need."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.lock = threading.Lock()

    def encode(self, text: str, *, chat: bool, special: bool, messages: tuple[tuple[str, str], ...] = ()) -> list[int]:
        """Token ids of a prompt; ``chat`` or ``messages`` render it with the chat template first."""
        if chat or messages:
            text = self.apply_chat_template(conversation(text, messages), add_generation_prompt=True)
            special = False  # the template writes its own special tokens
        with self.lock:
            return list(self.tokenizer.encode(text, add_special_tokens=special))

    def tokenize(self, text: str, *, use_chat_template: bool, add_special_tokens: bool) -> list[str]:
        ids = self.encode(text, chat=use_chat_template, special=add_special_tokens)
        with self.lock:
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return [str(token) for token in tokens]

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool) -> str:
        ids = token_ids(self.tokenizer, tokens)
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text if isinstance(text, str) else "".join(text)

    def apply_chat_template(self, turns: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise NotSupportedError("this model has no chat template")
        try:
            with self.lock:
                rendered = self.tokenizer.apply_chat_template(
                    turns, add_generation_prompt=add_generation_prompt, tokenize=False
                )
        except Exception as exc:  # jinja2 errors and raise_exception() in templates
            raise InvalidRequestError(f"the chat template refused the conversation: {exc}") from None
        return str(rendered)
