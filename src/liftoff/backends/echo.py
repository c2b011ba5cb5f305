"""The echo backend: a deterministic double with no dependencies, for tests, demos and benchmarks.

It "generates" the prompt back, one whitespace-delimited word per token, then stops as a model stops at EOS.
``min_new_tokens`` and ``ignore_eos`` make it cycle through the prompt again, so fixed-length loads are possible.
Options (``backend_options``): ``token_delay_ms`` (sleep per step), ``load_delay_ms`` (slow loading, to see the
loading state), ``fail_load`` (a message: loading fails with it) and ``crash_after_ms`` (the whole reader process
exits with code 70 that long after loading: a crashing model, to test restarts and crash loops).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field

from liftoff.backends.base import COMMON_OPTIONS, BackendContext, GenerativeBackend, ProgressCallback, StepOutput
from liftoff.backends.text import conversation, fit_prompt, render_chat_template
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotSupportedError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

_TOKEN = re.compile(r"\s*\S+|\s+")

CRASH_EXIT_CODE = 70  # the exit code of ``crash_after_ms`` (EX_SOFTWARE)

# A plain template so that chat requests work against echo readers (tests, demos).
ECHO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tokenize(text: str) -> list[str]:
    """Split text into echo tokens: each word with the whitespace before it; joining them gives the text back."""
    return _TOKEN.findall(text)


@dataclass(slots=True)
class _Sequence:
    request_id: str
    tokens: list[str]
    params: GenerationParams
    budget: int = 0
    generated: int = 0
    pieces: list[str] = field(default_factory=list)


class EchoBackend(GenerativeBackend):
    """Echoes prompts back token by token, with optional per-step delay."""

    name = "echo"
    honoured_options = COMMON_OPTIONS | {"max_sequence_length"}

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self._sequences: dict[str, _Sequence] = {}
        self._delay_s = float(self.options.get("token_delay_ms", 0)) / 1000.0

    @property
    def model_type(self) -> ModelType:
        return ModelType.CAUSAL

    def load(self, progress: ProgressCallback) -> None:
        delay_s = float(self.options.get("load_delay_ms", 0)) / 1000.0
        steps = 10
        for index in range(steps):
            if delay_s:
                time.sleep(delay_s / steps)
            progress((index + 1) / steps)
        if self.options.get("fail_load"):
            raise RuntimeError(str(self.options["fail_load"]))
        crash_after_ms = self.options.get("crash_after_ms")
        if crash_after_ms is not None:
            timer = threading.Timer(float(crash_after_ms) / 1000.0, os._exit, args=(CRASH_EXIT_CODE,))
            timer.daemon = True
            timer.start()

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        if params.regex_string is not None or params.json_schema is not None:
            raise NotSupportedError(
                "the echo backend echoes the prompt and cannot follow regex_string or json_schema; "
                "send structured generation to a reader of a real model (llamacpp or transformers)",
                param="json_schema" if params.regex_string is None else "regex_string",
            )
        if params.lora_id is not None:
            raise NotSupportedError(
                "the echo backend holds no LoRA adapters; send lora_id to a transformers reader with loras",
                param="lora_id",
            )
        words = tokenize(self._prompt(text, params))
        kept, budget = fit_prompt(range(len(words)), params, self.context_length)
        tokens = [words[i] for i in kept]
        self._sequences[request_id] = _Sequence(request_id, tokens, params, budget=budget)

    def _advance(self, seq: _Sequence) -> StepOutput:
        params = seq.params
        budget = seq.budget
        must_go_on = seq.generated < params.min_new_tokens or params.ignore_eos
        if not seq.tokens or (seq.generated >= len(seq.tokens) and not must_go_on):
            return self._finish(seq, FinishReason.STOP, "", 0)
        text = seq.tokens[seq.generated % len(seq.tokens)]
        seq.generated += 1
        if seq.generated >= budget:
            return self._finish(seq, FinishReason.LENGTH, text, 1)
        return StepOutput(seq.request_id, text, 1)

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str, n_tokens: int) -> StepOutput:
        del self._sequences[seq.request_id]
        return StepOutput(
            seq.request_id,
            text,
            n_tokens,
            finish_reason=reason,
            prompt_tokens=len(seq.tokens),
            completion_tokens=seq.generated,
        )

    def step(self) -> list[StepOutput]:
        if self._delay_s:
            time.sleep(self._delay_s)
        return [self._advance(seq) for seq in list(self._sequences.values())]

    def abort(self, request_id: str) -> bool:
        return self._sequences.pop(request_id, None) is not None

    def active(self) -> int:
        return len(self._sequences)

    def _prompt(self, text: str, params: GenerationParams) -> str:
        if params.use_chat_template or params.messages:
            return self.apply_chat_template(conversation(text, params.messages), add_generation_prompt=True)
        return text

    def prompt_length(self, text: str, params: GenerationParams) -> int:
        return len(tokenize(self._prompt(text, params)))

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        if use_chat_template:
            text = self.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenize(text)

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        if any(isinstance(token, int) for token in tokens):
            raise InvalidRequestError("the echo backend has no vocabulary ids; pass token strings", param="tokens")
        return "".join(str(token) for token in tokens)

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return render_chat_template(ECHO_CHAT_TEMPLATE, conversation, add_generation_prompt=add_generation_prompt)
