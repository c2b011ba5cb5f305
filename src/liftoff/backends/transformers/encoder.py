"""The transformers encoder backends: embeddings (sentence-transformers style) and sequence classification.

Both tokenize each input once on arrival (:meth:`prepare`: a text, or a pair joined by the tokenizer as a
sentence pair), cut it to the model's length or refuse it, and run batches that mix the inputs of many requests
(:meth:`encode`, one padded forward). Embeddings are pooled as the checkpoint's sentence-transformers files say
(:mod:`liftoff.backends.transformers.pooling`); classification rows are the raw logits (Takeoff's ``/classify``: not
softmaxed). ``backend_options``: ``dtype`` (``auto``: float32 on CPU, float16 on CUDA) and ``n_threads``.
Like the generative transformers backend, importing this module bounds OpenMP's spinning (``GOMP_SPINCOUNT``)
unless the environment sets it, so idle torch threads do not hold cores the gateway needs.
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # before torch: bounded OpenMP spinning (see transformers.backend)

import abc
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from liftoff.backends.base import COMMON_OPTIONS, BackendContext, EncoderBackend, Encoding, ProgressCallback
from liftoff.backends.resolve import resolve_model
from liftoff.backends.transformers.load import DTYPES, ModelLoadError, no_progress_bars, resolve_device, set_threads
from liftoff.backends.transformers.pooling import PoolingSpec, pool, read_pooling
from liftoff.backends.transformers.tokens import HFTokenizer
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError
from liftoff.core.types import ModelType

logger = logging.getLogger(__name__)

_UNBOUNDED = 1_000_000  # tokenizers without a limit report a huge model_max_length


class _EncoderBase(EncoderBackend):
    """What the embedding and classification backends share: loading, tokenizing, batching, threads."""

    name = "transformers"
    honoured_options = COMMON_OPTIONS | {"batch_duration_millis", "max_sequence_length", "truncate_inputs"}
    backend_options = frozenset({"dtype", "n_threads"})

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self._model: PreTrainedModel | None = None
        self._tokens: HFTokenizer | None = None
        self._device = torch.device("cpu")
        self.max_length = 512

    def _path(self) -> Path:
        model = self.context.model or resolve_model(
            self.config.model_name, self.context.repository_path, self.config.access_token
        )
        if model.format != "hf":
            raise ModelLoadError(f"{model.path} is a GGUF file; encoders are served from Hugging Face checkpoints")
        return model.path

    def load(self, progress: ProgressCallback) -> None:
        path = self._path()
        self._device = resolve_device(self.config.device)
        set_threads(self.options.get("n_threads"))
        dtype = self._dtype()
        progress(0.1)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "right"
        self._tokens = HFTokenizer(tokenizer)
        progress(0.3)
        with no_progress_bars():
            model = self._load_model(path, dtype)
        model.to(self._device)  # type: ignore[arg-type]  # transformers' stub types .to() oddly
        model.train(False)  # inference mode for dropout and norms
        self._model = model
        self.max_length = self._max_length(path, tokenizer.model_max_length, model.config)
        progress(1.0)
        logger.info("%s: %s, %s, at most %d tokens per input", path.name, self.model_type.value, dtype, self.max_length)

    def _dtype(self) -> torch.dtype:
        value = self.options.get("dtype")
        name = "auto" if value is None else str(value).lower().removeprefix("torch.")
        if name == "auto":
            return torch.float16 if self._device.type == "cuda" else torch.float32
        if name not in DTYPES:
            raise ModelLoadError(f"backend_options dtype={value!r} is not one of: auto, {', '.join(DTYPES)}")
        return DTYPES[name]

    @abc.abstractmethod
    def _load_model(self, path: Path, dtype: torch.dtype) -> PreTrainedModel:
        """The model of the checkpoint at ``path``, in ``dtype``."""

    def _declared_length(self, path: Path) -> int | None:
        return None

    def _max_length(self, path: Path, tokenizer_limit: int, config: Any) -> int:
        limits = [self._declared_length(path), self.config.max_sequence_length]
        if 0 < tokenizer_limit < _UNBOUNDED:
            limits.append(tokenizer_limit)
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limit for limit in limits if limit) if any(limits) else 512

    def close(self) -> None:
        self._model = None

    # ---- batching ---------------------------------------------------------------------------------------------

    def _tokenizer(self) -> HFTokenizer:
        if self._tokens is None:
            raise ModelLoadError("the model is not loaded")
        return self._tokens

    def prepare(self, text: str, pair: str | None = None, *, truncate: bool | None = None) -> Encoding:
        tokens = self._tokenizer()
        with tokens.lock:
            features = tokens.tokenizer(text, pair, truncation=False, verbose=False)
            n_tokens = len(features["input_ids"])
            if n_tokens <= self.max_length:
                return Encoding(dict(features), n_tokens)
            if not (self.truncate if truncate is None else truncate):
                raise ContextLengthExceededError(
                    f"the input has {n_tokens} tokens and the model takes at most {self.max_length} "
                    "(truncation is off: the request's truncate or the reader's truncate_inputs is false)",
                    param="text",
                )
            features = tokens.tokenizer(text, pair, truncation=True, max_length=self.max_length)
        return Encoding(dict(features), len(features["input_ids"]), truncated=True)

    def encode(self, batch: list[Encoding]) -> list[bytes]:
        tokens = self._tokenizer()
        with tokens.lock:
            padded = tokens.tokenizer.pad([encoding.features for encoding in batch], return_tensors="pt")
        inputs: dict[str, torch.Tensor] = {key: value.to(self._device) for key, value in padded.items()}
        with torch.inference_mode():
            rows = self._rows(inputs)
        array = rows.to(torch.float32).cpu().numpy().astype("<f4", copy=False)
        return [np.ascontiguousarray(row).tobytes() for row in array]

    @abc.abstractmethod
    def _rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One output row per input of a padded batch."""

    def _model_or_fail(self) -> PreTrainedModel:
        if self._model is None:
            raise ModelLoadError("the model is not loaded")
        return self._model

    # ---- tokenizer services -----------------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        return self.max_length

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        """The tokens of ``text``; ``use_chat_template`` (which the official client sends by default) is ignored
        when the model has no chat template, as encoders usually do not."""
        tokens = self._tokenizer()
        chat = use_chat_template and bool(getattr(tokens.tokenizer, "chat_template", None))
        return tokens.tokenize(text, use_chat_template=chat, add_special_tokens=add_special_tokens)

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer().detokenize(tokens, skip_special_tokens=skip_special_tokens)


class EmbeddingBackend(_EncoderBase):
    """Sentence embeddings: the encoder's token states pooled (and normalized) as the checkpoint declares."""

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self.pooling = PoolingSpec()

    @property
    def model_type(self) -> ModelType:
        return ModelType.EMBEDDING

    def _load_model(self, path: Path, dtype: torch.dtype) -> PreTrainedModel:
        self.pooling = read_pooling(path)
        model: PreTrainedModel = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model

    def _declared_length(self, path: Path) -> int | None:
        return self.pooling.max_seq_length

    def _rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self._model_or_fail()(**inputs).last_hidden_state
        return pool(states, inputs["attention_mask"], self.pooling)


class ClassificationBackend(_EncoderBase):
    """Sequence classification and cross-encoder reranking: one row of raw logits per input."""

    @property
    def model_type(self) -> ModelType:
        return ModelType.CLASSIFICATION

    def _load_model(self, path: Path, dtype: torch.dtype) -> PreTrainedModel:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not any(name.endswith("ForSequenceClassification") for name in config.architectures or []):
            raise ModelLoadError(f"{path.name} is not a *ForSequenceClassification checkpoint")
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
        return model

    def _rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self._model_or_fail()(**inputs).logits
        return logits
