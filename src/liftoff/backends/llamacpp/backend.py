"""The llama.cpp backend: GGUF models on CPU with continuous batching on llama.cpp's low-level batch API.

One context holds ``capacity`` sequence slots, each with its own KV stream (``kv_unified = False``), so every
sequence attends only over its own tokens. A step runs one ``llama_decode`` with the next token of every
running sequence, then prefills newly admitted prompts in chunks (at most ``prefill_tokens_per_step`` prompt
tokens while other sequences are running, so their streams keep flowing; everything waiting when nothing runs).
Tokens are chosen by the shared numpy sampler (within the request's grammar when it asks for structured output:
:mod:`liftoff.backends.grammar`, which reads the vocabulary as the token pieces' bytes) and decoded to text
incrementally, so multi-byte characters are never split.

Slots are taken lowest first and the decode rows go in slot order: with one KV stream per sequence, llama.cpp
splits a batch into one micro-batch per run of consecutive sequence ids (each a full pass over the weights).

Batch independence: a sequence's tokens come out the same whether it runs alone or among others. Prompts are
prefilled in chunks at fixed offsets (multiples of ``prefill_chunk_size``), a call never holds two chunks of one
prompt, and each chunk of 64 tokens or more gets a ``llama_decode`` of its own. The reasons: llama.cpp re-splits
a multi-sequence batch into micro-batches with an equal number of tokens per sequence, and its CPU
flash-attention kernel rounds differently from 64 query rows of a sequence up (tiled, in F32) than below (row by
row), so a shared call would let the neighbours move a prompt's numerics. Rows computed row by row (chunks under
64 tokens, the one-token decode rows) give the same bits whatever else is in the call.

Prefix cache: a finished sequence leaves its tokens in its slot's KV stream. A new prompt takes the free slot
whose kept tokens share the longest prefix with it (a system prompt, the earlier turns of a chat) and prefills
only the rest, as llama-server does. The reused positions were computed in other calls than a fresh prefill
would use, so a cache hit may round differently from a cold start; the batch-independence promise above holds
with ``prefix_cache: false``.

LoRA adapters (reader options ``loras`` and ``max_loras``): llama.cpp puts adapters on the whole context, so a
step runs one decode per adapter among its rows (and prefill calls hold one adapter's prompts);
:mod:`liftoff.backends.llamacpp.lora` loads and converts the adapters and chooses the groups. A reader without
adapters steps exactly as described above. Kept tokens are reused only by a prompt under the same adapter.

Options (``backend_options``): ``n_threads`` (default: every CPU), ``prefill_chunk_size`` (default 512; also
the reader option of that name), ``prefill_tokens_per_step`` (default 512), ``n_batch`` (llama.cpp's batch
size, default the larger of 512, the chunk size and the capacity), ``prefix_cache`` (default true) and
``llama_cpp_source`` (the llama.cpp source directory whose ``convert_lora_to_gguf.py`` converts PEFT adapters).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from liftoff.backends.base import (
    COMMON_OPTIONS,
    BackendContext,
    GenerativeBackend,
    Preparation,
    ProgressCallback,
    StepOutput,
)
from liftoff.backends.grammar import Grammars, Vocabulary
from liftoff.backends.grammar_limits import GRAMMAR_OPTIONS, GrammarLimits
from liftoff.backends.llamacpp.lora import LlamaCppLoraMixin, LlamaLoras
from liftoff.backends.llamacpp.native import NativeContext, NativeModel
from liftoff.backends.llamacpp.tokens import LlamaCppTokenizer
from liftoff.backends.prefix import flag, shared_prefix
from liftoff.backends.sampling import FAILED, SamplerState, finish_reason, sample, sequence_failure
from liftoff.backends.text import Utf8Stream, fit_prompt
from liftoff.config.loras import lora_entries
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

DEFAULT_CONTEXT = 2048
DEFAULT_CHUNK = 512
DEFAULT_PREFILL_PER_STEP = 512
ROW_WISE_LIMIT = 64  # llama.cpp's CPU flash attention is tiled from this many query rows per sequence
KNOWN_OPTIONS = frozenset(
    {"n_threads", "prefill_chunk_size", "prefill_tokens_per_step", "n_batch", "prefix_cache", "llama_cpp_source"}
)


@dataclass(slots=True, eq=False)
class _Sequence:
    request_id: str
    slot: int
    prompt: list[int]
    budget: int
    sampler: SamplerState
    stream: Utf8Stream
    prefilled: int = 0  # prompt tokens already in the KV cache
    pending: int = -1  # the last sampled token, not yet in the KV cache
    kv_len: int = 0  # positions of this sequence in the KV cache
    adapter: int = 0  # the key of its LoRA adapter (0: the base model)

    @property
    def position(self) -> int:
        """KV position of the pending token."""
        return len(self.prompt) + len(self.sampler.generated) - 1


class LlamaCppBackend(LlamaCppTokenizer, LlamaCppLoraMixin, GenerativeBackend):
    """GGUF models through llama-cpp-python's low-level API, continuously batched."""

    name = "llamacpp"
    honoured_options: ClassVar[frozenset[str]] = (
        COMMON_OPTIONS
        | GRAMMAR_OPTIONS
        | {
            "max_sequence_length",
            "prefill_chunk_size",
            "loras",
            "max_loras",
        }
    )
    backend_options: ClassVar[frozenset[str] | None] = KNOWN_OPTIONS

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self._model: NativeModel | None = None
        self._ctx: NativeContext | None = None
        self.grammars: Grammars | None = None  # structured generation: this model's compiled grammars
        self._context_length = config.max_sequence_length
        self._chunk = int(config.prefill_chunk_size or self.options.get("prefill_chunk_size") or DEFAULT_CHUNK)
        self._prefill_per_step = int(self.options.get("prefill_tokens_per_step") or DEFAULT_PREFILL_PER_STEP)
        self._sequences: dict[str, _Sequence] = {}
        self._slots: list[_Sequence | None] = [None] * self.capacity
        self._free = list(range(self.capacity))
        self._prefix_cache = flag(self.options.get("prefix_cache"), default=True)
        self._kept: list[list[int]] = [[] for _ in range(self.capacity)]  # tokens left in each free slot's KV
        self._kept_adapter = [0] * self.capacity  # the adapter those tokens were computed under
        self.loras: LlamaLoras | None = None  # the LoRA adapters; None until the first is added
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache, in total
        self._prefilling: list[_Sequence] = []  # admission order
        self._eog: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._eog_set: frozenset[int] = frozenset()

    @property
    def model_type(self) -> ModelType:
        return ModelType.CAUSAL

    @property
    def context_length(self) -> int | None:
        return self._context_length

    # ---- loading --------------------------------------------------------------------------------------------------

    def load(self, progress: ProgressCallback) -> None:
        if self.config.device != "cpu":
            raise RuntimeError(
                f"the llamacpp backend runs on CPU only (this llama-cpp-python has no {self.config.device} "
                "support); use the transformers backend for GGUF models on that device"
            )
        resolved = self.context.model
        if resolved is None or resolved.format != "gguf":
            raise RuntimeError(f"the llamacpp backend loads GGUF files; {self.config.model_name!r} is not one")
        model = NativeModel(resolved.path, lambda fraction: progress(0.9 * fraction))
        try:
            per_seq = self.config.max_sequence_length or min(model.n_ctx_train, DEFAULT_CONTEXT)
            n_batch = max(int(self.options.get("n_batch") or max(512, self._chunk)), self.capacity)
            n_threads = int(self.options.get("n_threads") or os.cpu_count() or 1)
            self._ctx = NativeContext(
                model, n_seq_max=self.capacity, per_seq_ctx=per_seq, n_batch=n_batch, n_threads=n_threads
            )
        except BaseException:
            model.close()
            raise
        self._chunk = min(self._chunk, n_batch)
        self._context_length = min(per_seq, self._ctx.n_ctx_seq)
        self._model = model
        self._eog = np.array(model.eog, dtype=np.int64)
        self._eog_set = frozenset(model.eog)
        self.grammars = Grammars(
            lambda: Vocabulary(model.pieces), model.eog, model.n_vocab, limits=GrammarLimits.of(self.config)
        )
        try:
            for name, source in lora_entries(self.config.loras):
                self.install_lora(self.load_lora(name, source))
        except BaseException:
            self.close()
            raise
        progress(1.0)

    def close(self) -> None:
        for request_id in list(self._sequences):
            self.abort(request_id)
        if self.loras is not None:
            self.loras.close()
            self.loras = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None
        self.grammars = None

    def _loaded(self) -> tuple[NativeModel, NativeContext]:
        if self._model is None or self._ctx is None:
            raise RuntimeError("the llamacpp backend is not loaded")
        return self._model, self._ctx

    # ---- requests -------------------------------------------------------------------------------------------------

    def preparation(self, params: GenerationParams) -> Preparation | None:
        """Compiling the request's grammar, when it has one that is not compiled yet."""
        return self.grammars.preparation(params) if self.grammars is not None else None

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        model, _ = self._loaded()
        adapter = self._adapter_key(params.lora_id)
        if not self._free:
            raise RuntimeError(f"the llamacpp backend is full ({self.capacity} sequences)")
        ids = self._prompt_ids(model, text, params)
        prompt, budget = fit_prompt(ids, params, self._context_length)
        if not prompt:
            if model.bos < 0:
                raise InvalidRequestError("the prompt is empty and this model has no BOS token to start from")
            prompt = [model.bos]
            budget = min(budget, (self._context_length or budget + 1) - 1)
        assert self.grammars is not None
        sampler = SamplerState(params, prompt, constraint=self.grammars.constraint(params))
        slot, reused = self._take_slot(prompt, adapter)
        seq = _Sequence(request_id, slot, prompt, budget, sampler, Utf8Stream(), adapter=adapter)
        if self.loras is not None:
            self.loras.acquire(adapter)
        seq.prefilled = seq.kv_len = reused
        self.reused_tokens += reused
        self._sequences[request_id] = seq
        self._slots[slot] = seq
        self._prefilling.append(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._sequences.get(request_id)
        if seq is None:
            return False
        self._release(seq)
        return True

    def active(self) -> int:
        return len(self._sequences)

    def _take_slot(self, prompt: list[int], adapter: int) -> tuple[int, int]:
        """A free slot for ``prompt`` (under LoRA ``adapter``), and how many of its first tokens that slot's KV
        already holds (tokens kept under another adapter are no prefix of it).

        Without a prefix to reuse, the lowest free slot (decode rows in slot order make fewer micro-batches). At
        least the last prompt token is always prefilled again: its logits choose the first output token.
        """
        slot, reused = self._free[0], 0
        if self._prefix_cache:
            for candidate in self._free:
                if self._kept_adapter[candidate] != adapter:
                    continue
                shared = shared_prefix(self._kept[candidate], prompt)
                if shared > reused:
                    slot, reused = candidate, shared
        self._free.remove(slot)
        heapq.heapify(self._free)
        reused = min(reused, len(prompt) - 1)
        _, ctx = self._loaded()
        if self._kept[slot] and not (reused and ctx.keep_prefix(slot, reused)):
            ctx.forget(slot)
            reused = 0
        self._kept[slot] = []
        self._kept_adapter[slot] = adapter
        return slot, reused

    def _release(self, seq: _Sequence) -> None:
        del self._sequences[seq.request_id]
        self._slots[seq.slot] = None
        if self.loras is not None:
            self.loras.release(seq.adapter)
        if seq.prefilled < len(seq.prompt):
            self._prefilling.remove(seq)
        if self._ctx is not None:
            if self._prefix_cache:
                self._kept[seq.slot] = (seq.prompt + seq.sampler.generated)[: seq.kv_len]
            else:
                self._ctx.forget(seq.slot)
        heapq.heappush(self._free, seq.slot)

    # ---- stepping -------------------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        _, ctx = self._loaded()
        outputs: list[StepOutput] = []
        for seq in [seq for seq in self._prefilling if seq.budget <= 0]:
            outputs.append(self._finish(seq, FinishReason.LENGTH, ""))
        running = [seq for seq in self._slots if seq is not None and seq.pending >= 0]  # by slot: fewer micro-batches
        if self.loras is None:
            if running:
                self._decode(ctx, running, outputs)
        else:  # one decode per adapter: llama.cpp puts adapters on the whole context
            for key, rows in self.loras.groups(running, [seq.adapter for seq in running]):
                self.loras.use(key)
                self._decode(ctx, rows, outputs)
        self._prefill(ctx, outputs, limit=self._prefill_per_step if running else None)
        return outputs

    def _decode(self, ctx: NativeContext, running: list[_Sequence], outputs: list[StepOutput]) -> None:
        """One decode of the pending token of every sequence in ``running``, and their next tokens."""
        batch = ctx.batch
        batch.token[: len(running)] = [seq.pending for seq in running]
        batch.pos[: len(running)] = [seq.position for seq in running]
        batch.seq_ptr[: len(running)] = batch.seq_address[[seq.slot for seq in running]]
        batch.logits[: len(running)] = 1
        ctx.decode(len(running))
        for seq in running:
            seq.kv_len = seq.position + 1
        self._sample(ctx, running, outputs)

    def _prefill(self, ctx: NativeContext, outputs: list[StepOutput], *, limit: int | None) -> None:
        """Prefill waiting prompts in rounds of one chunk per prompt, up to ``limit`` tokens (at least one chunk)."""
        spent = 0
        while self._prefilling:
            chunks: list[tuple[_Sequence, int, int]] = []
            for seq in self._prefilling:  # admission order decides who goes first when the budget is short
                start = seq.prefilled
                end = min(start + self._chunk, len(seq.prompt))
                if limit is not None and spent and spent + end - start > limit:
                    break
                chunks.append((seq, start, end))
                spent += end - start
            spent_all = len(chunks) < len(self._prefilling)
            order = self.loras.order if self.loras is not None else lambda key: (False, key)
            self._run_chunks(ctx, sorted(chunks, key=lambda chunk: (order(chunk[0].adapter), chunk[0].slot)), outputs)
            if spent_all:
                return

    def _run_chunks(self, ctx: NativeContext, chunks: list[tuple[_Sequence, int, int]], out: list[StepOutput]) -> None:
        """Run prompt chunks (at most one per prompt): small ones together, each of ``ROW_WISE_LIMIT`` or more alone.

        A call never holds two chunks of one prompt, so no sequence gets more rows in a call than its chunk, nor
        prompts of two LoRA adapters (``chunks`` come sorted by adapter).
        """
        row, ready, adapter = 0, list[_Sequence](), 0
        for seq, start, end in chunks:
            alone = end - start >= ROW_WISE_LIMIT
            if row and (alone or row + end - start > ctx.batch.size or seq.adapter != adapter):
                self._run_call(ctx, row, ready, out, adapter)
                row, ready = 0, []
            adapter = seq.adapter
            last = end == len(seq.prompt)
            row = ctx.batch.put_span(row, seq.prompt[start:end], start, seq.slot, last_logits=last)
            seq.prefilled = seq.kv_len = end
            if last:
                ready.append(seq)
                self._prefilling.remove(seq)
            if alone:
                self._run_call(ctx, row, ready, out, adapter)
                row, ready = 0, []
        self._run_call(ctx, row, ready, out, adapter)

    def _run_call(
        self, ctx: NativeContext, rows: int, ready: list[_Sequence], outputs: list[StepOutput], adapter: int
    ) -> None:
        if not rows:
            return
        if self.loras is not None:
            self.loras.use(adapter)
        ctx.decode(rows)
        if ready:
            self._sample(ctx, ready, outputs)

    def _sample(self, ctx: NativeContext, seqs: list[_Sequence], outputs: list[StepOutput]) -> None:
        """Pick the next token of every sequence in ``seqs`` (one logits row each, in order) and report it."""
        tokens = sample(ctx.logits(len(seqs)), [seq.sampler for seq in seqs], self._eog)
        model = self._model
        assert model is not None
        pieces, eog = model.pieces, self._eog_set
        for seq, token in zip(seqs, tokens, strict=True):
            if token == FAILED:
                outputs.append(self._fail(seq))
            elif token in eog:
                seq.sampler.generated.pop()  # the end-of-generation token is not part of the output
                outputs.append(self._finish(seq, FinishReason.STOP, ""))
            elif (reason := finish_reason(seq.sampler, seq.budget)) is not None:
                outputs.append(self._finish(seq, reason, seq.stream.feed(pieces[token]), 1))
            else:
                seq.pending = token
                outputs.append(StepOutput(seq.request_id, seq.stream.feed(pieces[token]), 1))

    def _fail(self, seq: _Sequence) -> StepOutput:
        """End a sequence whose token could not be chosen (its neighbours go on)."""
        self._release(seq)
        return StepOutput(seq.request_id, error=sequence_failure(seq.sampler))

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str, n_tokens: int = 0) -> StepOutput:
        self._release(seq)
        return StepOutput(
            seq.request_id,
            text + seq.stream.flush(),
            n_tokens,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.sampler.generated),
        )
