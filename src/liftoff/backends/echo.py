"""The echo backend: a deterministic double with no dependencies, for tests, demos and benchmarks.

It "generates" the prompt back, one whitespace-delimited word per token, then stops as a model stops at EOS.
``min_new_tokens`` and ``ignore_eos`` make it cycle through the prompt again, so fixed-length loads are possible.
Options (``backend_options``): ``token_delay_ms`` (sleep per step), ``load_delay_ms`` (slow loading, to see the
loading state) and ``fail_load`` (a message: loading fails with it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from liftoff.backends.base import COMMON_OPTIONS, Backend, ProgressCallback, StepOutput
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

_TOKEN = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """Split text into echo tokens: each word with the whitespace before it; joining them gives the text back."""
    return _TOKEN.findall(text)


@dataclass(slots=True)
class _Sequence:
    request_id: str
    tokens: list[str]
    params: GenerationParams
    generated: int = 0
    pieces: list[str] = field(default_factory=list)


class EchoBackend(Backend):
    """Echoes prompts back token by token, with optional per-step delay."""

    name = "echo"
    honoured_options = COMMON_OPTIONS | {"max_sequence_length"}

    def __init__(self, config: ReaderConfig, default_batch_size: int = 8) -> None:
        super().__init__(config, default_batch_size)
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

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        tokens = tokenize(text)
        if params.prompt_max_tokens is not None:
            tokens = tokens[-params.prompt_max_tokens :] if params.prompt_max_tokens else []
        limit = self.config.max_sequence_length
        if limit is not None and len(tokens) >= limit:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens but this reader's max_sequence_length is {limit}; "
                "shorten the prompt or set prompt_max_tokens"
            )
        self._sequences[request_id] = _Sequence(request_id, tokens, params)

    def _advance(self, seq: _Sequence) -> StepOutput:
        params = seq.params
        budget = params.max_new_tokens
        limit = self.config.max_sequence_length
        if limit is not None:
            budget = min(budget, limit - len(seq.tokens))
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
