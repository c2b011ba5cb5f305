"""The llama.cpp backend's tokenizer services: prompts as the model sees them, tokenize, detokenize, templates.

They use only the model and its vocabulary, which llama.cpp treats as read-only after loading, so they run on any
thread (the reader's services beside the engine thread). Kept apart from :mod:`liftoff.backends.llamacpp.backend`, which
schedules the batch.
"""

from __future__ import annotations

import abc

from liftoff.backends.llamacpp.native import NativeContext, NativeModel
from liftoff.backends.text import conversation, render_chat_template
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotSupportedError
from liftoff.core.types import GenerationParams


class LlamaCppTokenizer(abc.ABC):
    """Tokenizer services of a loaded GGUF model (mixed into the llama.cpp backend)."""

    config: ReaderConfig

    @abc.abstractmethod
    def _loaded(self) -> tuple[NativeModel, NativeContext]:
        """The loaded model and context (raises when not loaded)."""

    def _prompt_ids(self, model: NativeModel, text: str, params: GenerationParams) -> list[int]:
        """A request's prompt as the model sees it (chat template, ``messages``), before truncation."""
        return self._encode(
            model, text, use_chat_template=params.use_chat_template, add_special=True, messages=params.messages
        )

    def _encode(
        self,
        model: NativeModel,
        text: str,
        *,
        use_chat_template: bool,
        add_special: bool,
        messages: tuple[tuple[str, str], ...] = (),
    ) -> list[int]:
        if not (use_chat_template or messages):
            return model.tokenize(text, add_special=add_special, parse_special=False)
        rendered = self.apply_chat_template(conversation(text, messages), add_generation_prompt=True)
        has_bos = bool(model.bos_text) and rendered.startswith(model.bos_text)  # no second BOS
        return model.tokenize(rendered, add_special=add_special and not has_bos, parse_special=True)

    def prompt_length(self, text: str, params: GenerationParams) -> int:
        model, _ = self._loaded()
        return len(self._prompt_ids(model, text, params)) or 1  # an empty prompt starts from BOS

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        model, _ = self._loaded()
        ids = self._encode(model, text, use_chat_template=use_chat_template, add_special=add_special_tokens)
        return [model.token_text(token) for token in ids]

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        model, _ = self._loaded()
        if all(isinstance(token, int) for token in tokens):
            ids = [int(token) for token in tokens]
        elif all(isinstance(token, str) for token in tokens):
            ids = model.ids_of([str(token) for token in tokens])
        else:
            raise InvalidRequestError("pass either token ids or token strings, not both", param="tokens")
        return model.detokenize(ids, render_special=not skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        model, _ = self._loaded()
        if model.chat_template is None:
            raise NotSupportedError(f"the model {self.config.model_name!r} has no chat template in its GGUF file")
        return render_chat_template(
            model.chat_template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=model.bos_text,
            eos_token=model.eos_text,
        )
