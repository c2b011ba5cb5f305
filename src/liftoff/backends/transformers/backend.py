"""The transformers backend: causal language models with continuous batching over a KV cache kept across steps.

Loading: a Hugging Face checkpoint directory is loaded as it is; a GGUF file is first dequantized once into
``<repository_path>/dequantized/`` (:mod:`liftoff.backends.transformers.convert`). ``backend_options``: ``dtype``
(``auto`` by default: bfloat16 on CUDA and AMX CPUs, float32 on other CPUs, where it is faster; or ``bfloat16``,
``float32``, ``float16``), ``n_threads`` (torch threads, default: every CPU this process may use) and ``quantize``
(``none`` by default; ``int8``: int8 matrix products on CPU, 1.3-1.5x the throughput at batch 8-32 for some
precision, :mod:`liftoff.backends.transformers.quant`). The reader's ``device`` is ``cpu`` or ``cuda``.

Serving: every sequence owns one row of a preallocated KV cache (:mod:`liftoff.backends.transformers.cache`). A step
prefills newly admitted prompts in one right-padded batched forward (at most ``prefill_chunk_size`` padded tokens
per step, 1024 by default; a longer prompt is prefilled alone, one chunk per step; several prompts share a step
up to ``prefill_tokens_per_step`` padded tokens, 128 by default: about one ~100-token prompt per step, so that
running streams are not held up for long and requests that arrive together spread over steps instead of moving
in waves; on 2 cores at 8 streams this halves the time to first token, for ~10 % less throughput at 32) and
advances every running sequence by one token with a single ``[n, 1]`` forward. Tokens are chosen by the shared
numpy sampler (:mod:`liftoff.backends.sampling`), within the request's grammar when it asks for structured output
(:mod:`liftoff.backends.grammar`), and turned into text incrementally (:mod:`liftoff.backends.transformers.detok`,
:mod:`liftoff.backends.transformers.sequence`).

Threads: importing this module before torch sets ``GOMP_SPINCOUNT=30000`` unless the environment says
otherwise: OpenMP's idle threads spin that long (tens of microseconds) for the next parallel region, then sleep.
Spinning keeps the many small regions of a decode step fast (SmolLM2 on 2 cores, batch 32: 98 ms per step
against 125 ms with ``OMP_WAIT_POLICY=PASSIVE``), and the bound keeps threads from holding a core that the
gateway or another process needs (unbounded spinning on a shared 2-core machine slowed forwards 10-30x).
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # before torch is imported: libgomp reads it when it loads

import gc
import logging
from collections import deque

import numpy as np
import torch

from liftoff.backends.base import (
    COMMON_OPTIONS,
    BackendContext,
    GenerativeBackend,
    Preparation,
    ProgressCallback,
    StepOutput,
)
from liftoff.backends.grammar import Grammars, Vocabulary, huggingface_vocabulary
from liftoff.backends.grammar_limits import GRAMMAR_OPTIONS, GrammarLimits
from liftoff.backends.prefix import RowPrefixes, flag
from liftoff.backends.resolve import resolve_model
from liftoff.backends.sampling import SamplerState, sample
from liftoff.backends.text import fit_prompt
from liftoff.backends.transformers.cache import SlotCache
from liftoff.backends.transformers.convert import ensure_dequantized
from liftoff.backends.transformers.detok import Detokenizer, TextStream
from liftoff.backends.transformers.load import (
    DEFAULT_CONTEXT,
    LoadedModel,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    set_threads as set_torch_threads,
)
from liftoff.backends.transformers.lora import LoraSet, attach_loras, fits, lora_slot, prefix_key
from liftoff.backends.transformers.lora_runtime import LoraRuntime
from liftoff.backends.transformers.quant import calibration_ids, check_int8, quantize_linears, wants_int8
from liftoff.backends.transformers.sequence import HFSequence, account, finish
from liftoff.backends.transformers.tokens import HFTokenizer
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_BUDGET = 1024
DEFAULT_PREFILL_PER_STEP = 128
BACKEND_OPTIONS = frozenset({"dtype", "n_threads", "prefix_cache", "prefill_tokens_per_step", "quantize"})


class TransformersBackend(LoraRuntime, GenerativeBackend):
    """Causal LMs through ``transformers`` + ``torch``, continuously batched; LoRA adapters come and go at runtime
    (:mod:`liftoff.backends.transformers.lora_runtime`)."""

    name = "transformers"
    honoured_options = COMMON_OPTIONS | GRAMMAR_OPTIONS | {"max_sequence_length", "prefill_chunk_size", "loras",
                                                           "max_loras"}  # fmt: skip
    backend_options = BACKEND_OPTIONS

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self._loaded: LoadedModel | None = None
        self.lora: LoraSet | None = None  # the LoRA adapters (reader option loras), wrapped into the model
        self._cache: SlotCache | None = None
        self._detok: Detokenizer | None = None
        self._tok: HFTokenizer | None = None
        self.grammars: Grammars | None = None  # structured generation: this model's compiled grammars
        self._context: int | None = None
        self._eos = np.zeros(0, dtype=np.int64)
        self._eos_set: frozenset[int] = frozenset()
        self._budget = config.prefill_chunk_size or DEFAULT_PREFILL_BUDGET
        self._per_step = int(self.options.get("prefill_tokens_per_step") or DEFAULT_PREFILL_PER_STEP)
        self._waiting: deque[HFSequence] = deque()
        self._rows: list[HFSequence] = []  # decoding sequences; row i of the cache is self._rows[i]
        self._chunking: HFSequence | None = None  # a long prompt being prefilled in the last slot
        self._empty: list[HFSequence] = []  # admitted with nothing to generate
        self._prefix_cache = flag(self.options.get("prefix_cache"), default=True)
        self._prefixes = RowPrefixes()  # what the free rows still hold
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache, in total

    @property
    def model_type(self) -> ModelType:
        return ModelType.CAUSAL

    @property
    def context_length(self) -> int | None:
        return self._context if self._context is not None else self.config.max_sequence_length

    # ---- loading ------------------------------------------------------------------------------------------------

    def load(self, progress: ProgressCallback) -> None:
        progress(0.0)
        device = resolve_device(self.config.device)
        int8 = wants_int8(self.options.get("quantize"))
        dtype = resolve_dtype(self.options.get("dtype"), device, auto=torch.float32 if int8 else None)
        if int8:
            check_int8(device, dtype)
        if device.type == "cpu":
            set_torch_threads(self.options.get("n_threads"))
        model = self.context.model or resolve_model(
            self.config.model_name, self.context.repository_path, self.config.access_token
        )
        path = model.path
        if model.format == "gguf":
            path = ensure_dequantized(path, self.context.repository_path, dtype, lambda f: progress(0.85 * f))
        progress(0.85)
        loaded = load_causal_lm(path, dtype=dtype, device=device)
        if int8:
            quantize_linears(loaded.model, calibration_ids(loaded))
        self.lora = attach_loras(loaded.model, self.config, self.context.repository_path)  # after int8: wraps it
        progress(0.95)
        context = self._context_for(loaded)
        self._loaded = loaded
        self._context = context
        self._cache = SlotCache(self.capacity, context, dtype=dtype, device=device)
        self._detok = Detokenizer(loaded.tokenizer)
        self._tok = HFTokenizer(loaded.tokenizer)
        self._eos = np.array(loaded.eos_ids, dtype=np.int64)
        self._eos_set = frozenset(loaded.eos_ids)
        vocab_size = int(getattr(loaded.model.config.get_text_config(), "vocab_size", 0) or len(loaded.tokenizer))
        self.grammars = Grammars(self._vocabulary, loaded.eos_ids, vocab_size, limits=GrammarLimits.of(self.config))
        with torch.inference_mode():  # allocate the cache and warm the kernels up
            self._forward_prefill([[loaded.pad_id]], [0], 0, 0)
        logger.info(
            "loaded %s (%s, %s) with %d slots of %d tokens; KV cache %.0f MiB",
            path,
            str(dtype).removeprefix("torch."),
            device,
            self.capacity,
            context,
            self._cache.allocated_bytes / 2**20,
        )
        progress(1.0)

    def _context_for(self, loaded: LoadedModel) -> int:
        """``max_sequence_length``, else the model's trained context capped at 2048; never beyond the model's."""
        limit = loaded.max_positions
        wanted = self.config.max_sequence_length
        if wanted is None:
            return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        if limit is not None and wanted > limit:
            logger.warning("max_sequence_length %d is beyond the model's %d positions; using %d", wanted, limit, limit)
            return limit
        return wanted

    def close(self) -> None:
        self._loaded = self._cache = self._detok = self._tok = self.grammars = self.lora = None
        self._waiting.clear()
        self._rows.clear()
        self._prefixes.clear()
        self._chunking = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError("the transformers backend is not loaded")
        return self._loaded

    def _lora_model(self) -> torch.nn.Module:
        return self._model().model

    def _lora_slots_in_use(self) -> set[int]:
        held = [*self._waiting, *self._rows, *self._empty, *([self._chunking] if self._chunking else [])]
        return {seq.adapter for seq in held}

    def _lora_started(self) -> None:
        self._prefixes.clear()  # their keys carry no adapter mark

    # ---- admission ----------------------------------------------------------------------------------------------

    def preparation(self, params: GenerationParams) -> Preparation | None:
        """Compiling the request's grammar, when it has one that is not compiled yet."""
        return self.grammars.preparation(params) if self.grammars is not None else None

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        loaded = self._model()
        adapter = lora_slot(self.lora, params.lora_id)
        ids = self._prompt_ids(text, params)
        if not ids:
            bos = loaded.tokenizer.bos_token_id
            if bos is None:
                raise InvalidRequestError("the prompt is empty and this model has no BOS token to start from")
            ids = [int(bos)]
        prompt, budget = fit_prompt(ids, params, self.context_length)
        sampler = SamplerState(params, prompt, constraint=self._require_grammars().constraint(params))
        seq = HFSequence(request_id, prompt, sampler, budget, TextStream(prompt), adapter=adapter)
        if budget <= 0:
            self._empty.append(seq)
        else:
            self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        found = self._abort(request_id)
        self._release_loras()  # it may have been the last sequence of a removed adapter
        return found

    def _abort(self, request_id: str) -> bool:
        for queue in (self._waiting, self._empty):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return True
        if self._chunking is not None and self._chunking.request_id == request_id:
            self._chunking = None
            return True
        for index, seq in enumerate(self._rows):
            if seq.request_id == request_id:
                with torch.inference_mode():
                    self._remove_row(index)
                return True
        return False

    def active(self) -> int:
        return len(self._waiting) + len(self._rows) + len(self._empty) + (self._chunking is not None)

    # ---- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        out = [finish(seq, FinishReason.LENGTH, "") for seq in self._empty]
        self._empty.clear()
        with torch.inference_mode():
            if self._rows:
                self._decode(out)
            if self._chunking is not None or self._waiting:
                self._prefill(out)
            for index in sorted((i for i, seq in enumerate(self._rows) if seq.done), reverse=True):
                self._remove_row(index)
        self._release_loras()
        return out

    def _decode(self, out: list[StepOutput]) -> None:
        loaded, cache = self._model(), self._require_cache()
        rows = self._rows
        n = len(rows)
        lengths = [seq.length for seq in rows]
        positions = torch.tensor(lengths, dtype=torch.long, device=loaded.device)
        span = max(lengths) + 1
        cache.begin_decode(positions, span)
        if self.lora is not None:
            self.lora.select([seq.adapter for seq in rows])
        output = loaded.model(
            input_ids=torch.tensor([[seq.last] for seq in rows], device=loaded.device),
            position_ids=positions.view(n, 1),
            attention_mask=loaded.masks.decode(positions, span),
            cache=cache,
            use_cache=True,
        )
        for seq in rows:
            seq.length += 1
        self._advance(rows, self._sample(output.logits[:, -1], rows), out)

    def _prefill(self, out: list[StepOutput]) -> None:
        free = self.capacity - len(self._rows)
        if free <= 0:  # only when admitted beyond capacity: the rest waits for free rows
            return
        seq = self._chunking
        adapters = {row.adapter for row in self._rows}
        if seq is None and not fits(self.lora, adapters, self._waiting[0].adapter):
            return  # max_loras: the first in line waits for its adapter's turn, and the rest behind it
        if seq is None and len(self._waiting[0].prompt) > self._budget:
            seq = self._chunking = self._waiting.popleft()
        if seq is not None:
            self._prefill_chunk(seq, out)
            return
        batch: list[HFSequence] = []
        width = 0
        limit = min(self._budget, self._per_step)
        while self._waiting and len(batch) < free and len(self._waiting[0].prompt) <= self._budget:
            if not fits(self.lora, adapters, self._waiting[0].adapter):
                break
            wider = max(width, len(self._waiting[0].prompt))
            if batch and wider * (len(batch) + 1) > limit:
                break
            batch.append(self._waiting.popleft())
            adapters.add(batch[-1].adapter)
            width = wider
        row0 = len(self._rows)
        start = self._reuse_prefixes(batch, row0)
        logits = self._forward_prefill([seq.prompt[start:] for seq in batch], [s.adapter for s in batch], row0, start)
        for seq in batch:
            seq.length = len(seq.prompt)
            self._rows.append(seq)
        self._advance(batch, self._sample(logits, batch), out)

    def _reuse_prefixes(self, batch: list[HFSequence], row0: int) -> int:
        """Copy the longest cached prefix every prompt of ``batch`` shares into its row; the positions to skip.

        The batch prefills from one position, so it skips what all its prompts have (always keeping each prompt's
        last token, whose logits choose the first output token).
        """
        rows = range(row0, row0 + len(batch))
        if not self._prefix_cache:
            for row in rows:
                self._prefixes.overwrite(row)
            return 0
        running = [prefix_key(self.lora, s.adapter, s.prompt + s.sampler.generated[: s.length - len(s.prompt)])
                   for s in self._rows]  # fmt: skip
        sources = [self._prefixes.best_source(prefix_key(self.lora, seq.adapter, seq.prompt), row, running)
                   for seq, row in zip(batch, rows, strict=True)]  # fmt: skip
        mark = 0 if self.lora is None else 1
        start = max(
            0, min(min(shared - mark, len(s.prompt) - 1) for s, (_, shared) in zip(batch, sources, strict=True))
        )
        cache = self._require_cache()
        for (source, _), row in zip(sources, rows, strict=True):
            if start and source != row:
                cache.move_row(source, row, start)
            self._prefixes.overwrite(row)
        self.reused_tokens += start * len(batch)
        return start

    def _prefill_chunk(self, seq: HFSequence, out: list[StepOutput]) -> None:
        """One chunk of a prompt longer than the prefill budget, in the last slot; it joins the rows when done."""
        slot = self.capacity - 1
        self._prefixes.overwrite(slot)
        start = seq.length
        end = min(len(seq.prompt), start + self._budget)
        logits = self._forward_prefill([seq.prompt[start:end]], [seq.adapter], slot, start)
        seq.length = end
        if end < len(seq.prompt):
            return
        self._chunking = None
        self._prefixes.overwrite(len(self._rows))
        self._require_cache().move_row(slot, len(self._rows), seq.length)
        self._rows.append(seq)
        self._advance([seq], self._sample(logits, [seq]), out)

    def _forward_prefill(self, prompts: list[list[int]], adapters: list[int], row0: int, start: int) -> torch.Tensor:
        """Run ``prompts`` (right-padded; LoRA slots ``adapters``) into rows ``row0..`` from position ``start``;
        each one's last logits."""
        loaded, cache = self._model(), self._require_cache()
        device = loaded.device
        width = max(len(p) for p in prompts)
        padded = [p + [loaded.pad_id] * (width - len(p)) for p in prompts]
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        positions = (torch.arange(width, device=device) + start).expand(len(prompts), width)
        cache.begin_prefill(row0, len(prompts), start, width)
        if self.lora is not None:
            self.lora.select(adapters)
        output = loaded.model(
            input_ids=torch.tensor(padded, device=device),
            position_ids=positions,
            attention_mask=loaded.masks.prefill(lengths, start, width),
            cache=cache,
            use_cache=True,
            logits_to_keep=(lengths - 1).view(-1, 1),
        )
        logits: torch.Tensor = output.logits[:, -1]
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[HFSequence]) -> list[int]:
        scores = logits.float().cpu().numpy()
        return sample(scores, [seq.sampler for seq in seqs], self._eos)

    def _advance(self, seqs: list[HFSequence], tokens: list[int], out: list[StepOutput]) -> None:
        """Account each sequence's new token: text, end of sequence, length limit."""
        detok = self._require_detok()
        eos = self._eos_set
        with self._tokens().lock:  # the tokenizer services may be encoding on another thread
            for seq, token in zip(seqs, tokens, strict=True):
                account(seq, token, detok, eos, out)

    def _remove_row(self, index: int) -> None:
        """Free row ``index``: the last row moves into it, so the running rows stay contiguous."""
        last = len(self._rows) - 1
        left = self._rows[last]  # its tokens stay in row ``last``, which becomes free
        if index != last:
            self._require_cache().move_row(last, index, left.length)
            self._rows[index] = left
        self._rows.pop()
        if self._prefix_cache:
            self._prefixes.keep(
                last, prefix_key(self.lora, left.adapter, (left.prompt + left.sampler.generated)[: left.length])
            )

    def _require_cache(self) -> SlotCache:
        if self._cache is None:
            raise RuntimeError("the transformers backend is not loaded")
        return self._cache

    def _require_grammars(self) -> Grammars:
        if self.grammars is None:
            raise RuntimeError("the transformers backend is not loaded")
        return self.grammars

    def _vocabulary(self) -> Vocabulary:
        """The model's tokens as the grammar sees them (built on the first constrained request)."""
        tokens = self._tokens()
        with tokens.lock:
            return huggingface_vocabulary(tokens.tokenizer)

    def _require_detok(self) -> Detokenizer:
        if self._detok is None:
            raise RuntimeError("the transformers backend is not loaded")
        return self._detok

    # ---- tokenizer services (any thread) ------------------------------------------------------------------------

    def _tokens(self) -> HFTokenizer:
        if self._tok is None:
            raise RuntimeError("the transformers backend is not loaded")
        return self._tok

    def prompt_length(self, text: str, params: GenerationParams) -> int:
        return len(self._prompt_ids(text, params))

    def _prompt_ids(self, text: str, params: GenerationParams) -> list[int]:
        """A request's prompt as the model sees it (chat template, ``messages``), before truncation."""
        return self._tokens().encode(text, chat=params.use_chat_template, special=True, messages=params.messages)

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        return self._tokens().tokenize(text, use_chat_template=use_chat_template, add_special_tokens=add_special_tokens)

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        return self._tokens().detokenize(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return self._tokens().apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
