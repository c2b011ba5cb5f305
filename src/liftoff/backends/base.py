"""The backend contracts: a :class:`ModelBackend` loads a model and offers its tokenizer; a generative
:class:`GenerativeBackend` then admits, steps and aborts sequences (continuous batching), and an :class:`EncoderBackend`
encodes batches of inputs (embeddings, classification scores: dynamic batching).

The reader's engine thread owns a generative backend and drives it: between steps it admits new requests (up to
``capacity``) and aborts cancelled ones; each ``step()`` advances every active sequence by one token (or
finishes it) and returns what each produced. The reader's batcher thread owns an encoder backend: it tokenizes
each input on arrival (``prepare``) and runs ``encode`` on batches that mix the inputs of many requests.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from liftoff.backends.resolve import ResolvedModel
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import LiftoffError, NotFoundError, NotSupportedError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

ProgressCallback = Callable[[float], None]

# Takeoff's default wait for a dynamic batch to fill (takeoff-spec §1.4).
DEFAULT_BATCH_DURATION_MS = 100

# Reader options every backend honours (they are about the reader, its process and its gateway, not the model
# engine): the reader process sets CUDA_VISIBLE_DEVICES and its log format, the gateway buffers and restarts.
COMMON_OPTIONS: frozenset[str] = frozenset(
    {
        "model_name",
        "device",
        "consumer_group",
        "backend",
        "backend_options",
        "log_level",
        "max_batch_size",
        "redis_host",
        "internal_gateway_ip",
        "reader_log_as_json",
        "buffer_requests",
        "cuda_visible_devices",
        "restart_policy",
    }
)


@dataclass(frozen=True)
class BackendContext:
    """What a backend needs from the reader besides its own config."""

    default_batch_size: int = 8
    repository_path: Path = field(default_factory=lambda: Path.home() / "artefacts")
    model: ResolvedModel | None = None


@dataclass(slots=True)
class StepOutput:
    """What one sequence produced in one step: new text and, when it ended, why."""

    request_id: str
    text: str = ""
    n_tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: LiftoffError | None = None


@dataclass(frozen=True, slots=True)
class Preparation:
    """Slow work a request needs before it can join the batch (compiling its grammar).

    The engine runs ``run`` on a thread of its own, so the running sequences keep stepping, and admits the request
    when it is done; a request still waiting after ``timeout_s`` fails with a 400 that says it took too long.
    """

    run: Callable[[], object]
    timeout_s: float
    what: str  # in words, for that error: "compiling its json_schema"
    quiet_s: float = 0.0  # how long ``run`` may hold the whole process at once (a first import): announced first


@dataclass(slots=True)
class Encoding:
    """One input of an encoder, tokenized: the tokenizer's features and what the response reports about it."""

    features: dict[str, list[int]]
    n_tokens: int
    truncated: bool = False


class ModelBackend(abc.ABC):
    """A model a reader loads: its kind, its loading, its tokenizer services and its options."""

    name: ClassVar[str] = "base"
    honoured_options: ClassVar[frozenset[str]] = COMMON_OPTIONS
    backend_options: ClassVar[frozenset[str] | None] = None  # the ``backend_options`` keys it knows (None: any)

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        self.config = config
        self.context = context or BackendContext()
        self.options: dict[str, Any] = dict(config.backend_options or {})
        self.capacity = config.max_batch_size or self.context.default_batch_size

    @property
    @abc.abstractmethod
    def model_type(self) -> ModelType:
        """What this backend serves."""

    @abc.abstractmethod
    def load(self, progress: ProgressCallback) -> None:
        """Load the model (blocking; runs in a worker thread). Raise to report a load failure."""

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release the model. The default does nothing."""

    # ---- tokenizer services (called from the reader's event loop thread, concurrently with ``step``) -------------

    @property
    def context_length(self) -> int | None:
        """Most tokens (prompt plus output) one sequence may hold; None when unbounded."""
        return self.config.max_sequence_length

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        """The tokens of ``text`` as vocabulary strings (``▁hello``, ``Ġworld``)."""
        raise NotSupportedError(f"the {self.name} backend has no tokenizer")

    def prompt_length(self, text: str, params: GenerationParams) -> int:
        """Tokens in a request's prompt as the model sees it (chat template, ``messages``), before truncation."""
        if params.messages:
            raise NotSupportedError(f"the {self.name} backend cannot count the tokens of a conversation")
        return len(self.tokenize(text, use_chat_template=params.use_chat_template))

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids or vocabulary strings."""
        raise NotSupportedError(f"the {self.name} backend has no tokenizer")

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """One conversation rendered with the model's chat template."""
        raise NotSupportedError(f"the {self.name} backend's model has no chat template")

    def notes(self) -> list[str]:
        """Reader options that were set but have no effect with this backend (reported, never dropped)."""
        fields = self.config.public_dict()
        honoured = self.honoured_options | ({"access_token"} if self._token_used() else frozenset())
        ignored = sorted(name for name in fields if name not in honoured)
        notes = [self._note(name, fields[name]) for name in ignored]
        known = self.backend_options
        if known is not None:
            notes.extend(
                f"backend_options {key!r}={self.options[key]!r} is not an option of the {self.name} backend "
                f"(it has: {', '.join(sorted(known))})"
                for key in sorted(self.options)
                if key not in known
            )
        return notes

    def _token_used(self) -> bool:
        """Whether ``access_token`` served: the model was looked up on the Hugging Face hub with it."""
        model = self.context.model
        return model is not None and model.from_hub

    def _note(self, name: str, value: Any) -> str:
        """Why an option set on this reader has no effect."""
        if name == "access_token":
            return (f"access_token={value!r} is accepted but has no effect: it is used only to fetch a model from the "
                    f"Hugging Face hub, and {self.config.model_name!r} was not fetched from it")  # fmt: skip
        return f"{name}={value!r} is accepted but has no effect with the {self.name} backend"


class GenerativeBackend(ModelBackend):
    """A generative model that serves sequences with continuous batching."""

    def preparation(self, params: GenerationParams) -> Preparation | None:
        """Work a request needs before :meth:`admit` that may take long (None: nothing); raise a
        :class:`LiftoffError` to refuse the request. The default needs nothing."""
        return None

    @abc.abstractmethod
    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        """Add a sequence to the running batch. Raise a :class:`LiftoffError` to refuse it."""

    @abc.abstractmethod
    def step(self) -> list[StepOutput]:
        """Advance every active sequence by one step; finished sequences leave the batch."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool:
        """Drop a sequence from the batch; return whether it was there."""

    @abc.abstractmethod
    def active(self) -> int:
        """Number of sequences in the batch."""

    # ---- LoRA adapters added and removed at runtime (the management API's /reader/{id}/loras) -------------------

    def load_lora(self, name: str, source: str) -> object:
        """Any thread, may be slow: find and read adapter ``name`` from ``source`` (as one entry of ``loras``),
        ready to install. Raises a :class:`LiftoffError` subclass (400-type, naming the adapter) when it cannot be
        served on this model. The default: this backend holds no LoRA adapters."""
        raise NotSupportedError(f"LoRA {name[:128]!r}: the {self.name} backend holds no LoRA adapters (serve them "
                                "with backend: transformers)", param="name")  # fmt: skip

    def install_lora(self, loaded: object) -> None:
        """Engine thread, between steps, cheap: make the adapter :meth:`load_lora` returned selectable by
        ``lora_id``. A name the reader already holds is an :class:`InvalidRequestError`."""
        raise NotSupportedError(f"the {self.name} backend holds no LoRA adapters")

    def remove_lora(self, name: str) -> None:
        """Engine thread: new requests naming ``name`` are refused from now on; sequences already running under it
        finish under it, and its memory is freed when the last of them ends. An unknown name is a
        :class:`NotFoundError` that lists the adapters."""
        raise NotFoundError(f"LoRA {name[:128]!r} is not an adapter of this reader; it has none", param="name")

    def lora_names(self) -> list[str]:
        """The adapters a request may name now, in order (any thread)."""
        return []


class EncoderBackend(ModelBackend):
    """An encoder (embeddings or classification scores) served with dynamic batching.

    ``capacity`` is the largest batch. ``truncate`` says what happens to an input longer than the model takes:
    cut to fit (the response says so) or refused with a 400; a request may override it.
    """

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self.truncate = config.truncate_inputs is not False
        millis = config.batch_duration_millis
        self.batch_duration_s = (DEFAULT_BATCH_DURATION_MS if millis is None else millis) / 1000.0

    @abc.abstractmethod
    def prepare(self, text: str, pair: str | None = None, *, truncate: bool | None = None) -> Encoding:
        """Tokenize one input (``pair``: the second text of a sentence pair); raise a :class:`LiftoffError` to
        refuse it (too long with truncation off)."""

    @abc.abstractmethod
    def encode(self, batch: list[Encoding]) -> list[bytes]:
        """One row per input, as little-endian float32 bytes (an embedding, or a row of scores)."""


class RemoteBackend(ModelBackend):
    """A model served by another server (``device: api``): each request is forwarded on its own and streamed back.

    There is no batch to step: the reader's relay runs many requests at once on an asyncio loop of its own (up to
    ``capacity``), and cancelling a request's task cancels its upstream request. ``open``, ``close``, ``watch``,
    ``generate`` and ``embed`` run on that loop; ``health`` is read from any thread.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open connections (on the relay's loop)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close them."""

    @abc.abstractmethod
    async def watch(self) -> None:
        """Check the upstream's health until cancelled."""

    @abc.abstractmethod
    def health(self) -> str:
        """Why the reader cannot serve now (its upstream is down); empty when it can."""

    @abc.abstractmethod
    def generate(self, request_id: str, text: str, params: GenerationParams) -> AsyncGenerator[StepOutput, None]:
        """The outputs of one generation as they stream; the last one has a ``finish_reason``."""

    @abc.abstractmethod
    async def embed(self, inputs: list[str], truncate: bool | None) -> tuple[list[bytes], list[int]]:
        """One float32 row per input, and each input's tokens."""
