"""The ctypes plumbing of the llama.cpp backend: model and vocabulary, one context, and a reusable batch.

Everything here wraps llama-cpp-python's low-level bindings (``llama_cpp.llama_*``); the scheduling lives in
:mod:`liftoff.backends.llamacpp.backend`. :class:`NativeModel` only uses the model and its vocabulary, which llama.cpp
treats as read-only after loading, so its methods may be called from any thread. :class:`NativeContext` owns the
KV cache and must only be driven from the engine thread. :class:`NativeBatch` is a ``llama_batch`` whose arrays
are numpy buffers, so filling it is a few vectorised assignments instead of one ctypes call per field.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import llama_cpp as llama
import numpy as np
import numpy.typing as npt

from liftoff.core.errors import InvalidRequestError

logger = logging.getLogger(__name__)

_LOG_ERROR = 3  # GGML_LOG_LEVEL_ERROR; the rest (info, warn, debug, continuation) goes to debug
_init_lock = threading.Lock()
_initialised = False


@llama.llama_log_callback  # type: ignore[untyped-decorator]
def _log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's log lines to Python logging (it prints every tensor it loads to stderr otherwise)."""
    if text and logger.isEnabledFor(logging.ERROR if level == _LOG_ERROR else logging.DEBUG):
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            logger.log(logging.ERROR if level == _LOG_ERROR else logging.DEBUG, "llama.cpp: %s", message)


def init_backend() -> None:
    """``llama_backend_init`` and the log routing, once per process."""
    global _initialised
    with _init_lock:
        if not _initialised:
            llama.llama_log_set(_log, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _initialised = True


class NativeModel:
    """A loaded GGUF model: its vocabulary, metadata and per-token tables. Thread-safe (read-only)."""

    def __init__(self, path: Path, progress: Callable[[float], None]) -> None:
        init_backend()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0

        @llama.llama_progress_callback  # type: ignore[untyped-decorator]
        def on_progress(fraction: float, user_data: ctypes.c_void_p) -> bool:
            progress(float(fraction))
            return True

        params.progress_callback = on_progress
        pointer = llama.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise RuntimeError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        self.pointer: Any = pointer
        self.vocab: Any = llama.llama_model_get_vocab(pointer)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(pointer))
        self.bos = int(llama.llama_vocab_bos(self.vocab))
        self.eos = int(llama.llama_vocab_eos(self.vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self.bos_text = self.token_text(self.bos) if self.bos >= 0 else ""
        self.eos_text = self.token_text(self.eos) if self.eos >= 0 else ""
        template = llama.llama_model_chat_template(pointer, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self.pieces, self.eog = self._tables()
        self._ids_by_text: dict[str, int] | None = None
        self._lock = threading.Lock()

    def _tables(self) -> tuple[list[bytes], list[int]]:
        """Each token's output bytes (special tokens render as nothing) and the end-of-generation tokens."""
        buffer = ctypes.create_string_buffer(256)
        to_piece, is_eog, vocab = llama.llama_token_to_piece, llama.llama_vocab_is_eog, self.vocab
        pieces: list[bytes] = []
        eog: list[int] = []
        for token in range(self.n_vocab):
            n = to_piece(vocab, token, buffer, 256, 0, False)
            pieces.append(buffer.raw[:n] if n >= 0 else self._long_piece(token, -n))
            if is_eog(vocab, token):
                eog.append(token)
        return pieces, eog

    def _long_piece(self, token: int, size: int) -> bytes:
        buffer = ctypes.create_string_buffer(size)
        n = llama.llama_token_to_piece(self.vocab, token, buffer, size, 0, False)
        return buffer.raw[: max(n, 0)]

    def meta(self, key: str) -> str | None:
        """A scalar GGUF metadata value as text, or None."""
        buffer = ctypes.create_string_buffer(4096)
        n = llama.llama_model_meta_val_str(self.pointer, key.encode(), buffer, 4096)
        return None if n < 0 else buffer.value.decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the model asks, ``parse_special`` reads
        special-token texts such as ``<|im_start|>`` as those tokens."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            ids = (llama.llama_token * size)()
            n = llama.llama_tokenize(self.vocab, data, len(data), ids, size, add_special, parse_special)
            if n >= 0:
                return list(ids[:n])
            size = -n

    def token_text(self, token: int) -> str:
        """The vocabulary string of a token (``Ġhello``, ``<|im_end|>``)."""
        raw = llama.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def ids_of(self, texts: Sequence[str]) -> list[int]:
        """Token ids of vocabulary strings; an unknown string is an invalid request."""
        with self._lock:
            if self._ids_by_text is None:
                self._ids_by_text = {self.token_text(token): token for token in range(self.n_vocab)}
            table = self._ids_by_text
        ids = []
        for text in texts:
            token = table.get(text)
            if token is None:
                raise InvalidRequestError(f"{text!r} is not a token of this model's vocabulary", param="tokens")
            ids.append(token)
        return ids

    def detokenize(self, ids: Sequence[int], *, render_special: bool) -> str:
        """Text of token ids, with or without the text of special (control) tokens."""
        bad = [token for token in ids if not 0 <= token < self.n_vocab]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside this model's vocabulary (0..{self.n_vocab - 1})", param="tokens"
            )
        array = (llama.llama_token * max(len(ids), 1))(*ids)
        size = 16 * len(ids) + 16
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama.llama_detokenize(self.vocab, array, len(ids), buffer, size, False, render_special)
            if n >= 0:
                return buffer.raw[:n].decode("utf-8", "replace")
            size = -n

    def close(self) -> None:
        """Free the model (its vocabulary goes with it)."""
        if self.pointer:
            llama.llama_model_free(self.pointer)
            self.pointer = None


class NativeBatch:
    """A ``llama_batch`` over numpy arrays: one token per row, each row in one sequence."""

    def __init__(self, size: int, n_seq_max: int) -> None:
        self.size = size
        self.token = np.zeros(size, dtype=np.int32)
        self.pos = np.zeros(size, dtype=np.int32)
        self.logits = np.zeros(size, dtype=np.int8)
        self._n_seq_id = np.ones(size, dtype=np.int32)
        self._seq_values = np.arange(n_seq_max, dtype=np.int32)  # row i points at the id of its sequence here
        self.seq_address = self._seq_values.ctypes.data + 4 * np.arange(n_seq_max, dtype=np.uintp)
        self.seq_ptr = np.zeros(size + 1, dtype=np.uintp)
        self.struct: Any = cast(Any, llama.llama_batch())  # its stubs type the pointer fields as arrays
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        self.struct.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self.seq_ptr.ctypes.data, ctypes.POINTER(ctypes.POINTER(llama.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.n_tokens = 0

    def put_span(self, start: int, tokens: Sequence[int], first_pos: int, seq_id: int, *, last_logits: bool) -> int:
        """Rows ``start..`` get ``tokens`` of one sequence at consecutive positions; returns the next free row."""
        end = start + len(tokens)
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(first_pos, first_pos + len(tokens), dtype=np.int32)
        self.seq_ptr[start:end] = self.seq_address[seq_id]
        self.logits[start:end] = 0
        if last_logits:
            self.logits[end - 1] = 1
        return end


class NativeContext:
    """One llama.cpp context: a KV cache with one stream per sequence slot. Engine thread only."""

    def __init__(self, model: NativeModel, *, n_seq_max: int, per_seq_ctx: int, n_batch: int, n_threads: int) -> None:
        if n_seq_max > int(llama.llama_max_parallel_sequences()):
            raise RuntimeError(
                f"max_batch_size {n_seq_max} is more than llama.cpp's {llama.llama_max_parallel_sequences()} "
                "parallel sequences"
            )
        params = llama.llama_context_default_params()
        params.n_ctx = per_seq_ctx * n_seq_max
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = False  # one KV stream per sequence: attention only over the sequence's own tokens
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.no_perf = True
        pointer = llama.llama_init_from_model(model.pointer, params)
        if not pointer:
            raise RuntimeError(
                f"llama.cpp could not create a context of {n_seq_max} x {per_seq_ctx} tokens (out of memory?)"
            )
        self.pointer: Any = pointer
        self.model = model
        self.n_ctx_seq = int(llama.llama_n_ctx_seq(pointer))
        self.memory: Any = llama.llama_get_memory(pointer)
        self.batch = NativeBatch(n_batch, n_seq_max)
        self._logits_type: dict[int, Any] = {}

    def decode(self, n_tokens: int) -> None:
        """Run the first ``n_tokens`` rows of the batch."""
        self.batch.struct.n_tokens = n_tokens
        status = llama.llama_decode(self.pointer, self.batch.struct)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on a batch of {n_tokens} tokens")

    def logits(self, n_rows: int) -> npt.NDArray[np.float32]:
        """The logits of the rows that asked for them in the last decode, in batch order (a view: read it before
        the next decode)."""
        pointer = llama.llama_get_logits(self.pointer)
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        count = n_rows * self.model.n_vocab
        array_type = self._logits_type.get(count)
        if array_type is None:
            array_type = self._logits_type.setdefault(count, ctypes.c_float * count)
        view = np.frombuffer(array_type.from_address(address), dtype=np.float32)
        return view.reshape(n_rows, self.model.n_vocab)

    def forget(self, seq_id: int) -> None:
        """Drop every cached token of one sequence slot."""
        llama.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def keep_prefix(self, seq_id: int, length: int) -> bool:
        """Keep the first ``length`` positions of one slot and drop the rest; False when llama.cpp cannot."""
        return bool(llama.llama_memory_seq_rm(self.memory, seq_id, length, -1))

    def close(self) -> None:
        """Free the context and its KV cache."""
        if self.pointer:
            llama.llama_free(self.pointer)
            self.pointer = None
