"""The transformers backend's KV cache: one preallocated row per slot, written in place, never recomputed.

Every layer keeps keys and values of shape ``[slots, kv_heads, positions, head_dim]``; ``positions`` starts at
512 and doubles when a sequence needs more, up to the context length (so memory follows the longest sequence
served so far rather than the context). Running (decoding) sequences
live in rows ``0..n-1``; a step's forward writes each row's new key and value at that row's own position and
attends over the views ``[:n, :, :max_len]`` (no gather, no concatenation). Padding and unused positions are
hidden by the 4D attention masks built here (boolean for SDPA, additive for eager attention), which the models
of transformers take as they are. A sequence that leaves frees its row: the caller moves the last row into it
(:meth:`SlotCache.move_row`) so that the running rows stay contiguous.

Unused positions hold zeros or stale (finite) values: masked positions still enter the attention's matmuls with
weight zero, so nothing here may ever be NaN. Every query row of a mask therefore allows at least its own position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

Mask = torch.Tensor | dict[str, torch.Tensor]


class SlotCache(Cache):
    """A fixed-size, per-slot KV cache that a model's attention layers update through ``update``."""

    def __init__(
        self, slots: int, context: int, *, dtype: torch.dtype, device: torch.device, initial: int = 512
    ) -> None:
        super().__init__(layers=[])
        self.slots = slots
        self.context = context
        self.allocated = min(initial, context)  # positions allocated per row; grows (doubling) up to ``context``
        self.dtype = dtype
        self.device = device
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        # The current forward: decode (rows 0..n-1, one token each) or prefill (rows row0..row0+m-1 from start).
        self._decode = True
        self._rows = 0
        self._row0 = 0
        self._start = 0
        self._length = 0
        self._flat_index: dict[int, torch.Tensor] = {}
        self._positions = torch.zeros(0, dtype=torch.long)

    # ---- set up before each forward -----------------------------------------------------------------------------

    def begin_decode(self, positions: torch.Tensor, length: int) -> None:
        """The next forward appends one token to each of rows ``0..n-1``, at ``positions`` (a ``[n]`` tensor)."""
        self._reserve(length)
        self._decode = True
        self._rows = int(positions.shape[0])
        self._positions = positions
        self._length = length
        self._flat_index = {}

    def begin_prefill(self, row0: int, rows: int, start: int, length: int) -> None:
        """The next forward writes ``length`` positions from ``start`` into rows ``row0..row0+rows-1``."""
        self._reserve(start + length)
        self._decode = False
        self._row0 = row0
        self._rows = rows
        self._start = start
        self._length = length

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` (every layer)."""
        if src == dst or length <= 0:
            return
        for keys, values in zip(self._keys, self._values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def row(self, layer: int, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of one row (for tests and debugging)."""
        return self._keys[layer][row, :, :length], self._values[layer][row, :, :length]

    @property
    def allocated_bytes(self) -> int:
        """Memory held by the layers allocated so far."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    # ---- the transformers Cache interface -----------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values of layer ``layer_idx``; return what the layer attends over."""
        while len(self._keys) <= layer_idx:
            self._allocate(key_states, value_states)
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if self._decode:
            n, heads, _, _ = key_states.shape
            index = self._decode_index(heads)
            keys.view(-1, keys.shape[-1]).index_copy_(0, index, key_states.reshape(n * heads, -1))
            values.view(-1, values.shape[-1]).index_copy_(0, index, value_states.reshape(n * heads, -1))
            return keys[:n, :, : self._length], values[:n, :, : self._length]
        rows = slice(self._row0, self._row0 + self._rows)
        end = self._start + self._length
        keys[rows, :, self._start : end] = key_states
        values[rows, :, self._start : end] = value_states
        if self._start == 0:
            return key_states, value_states
        return keys[rows, :, :end], values[rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest sequence the current forward attends over."""
        return self._length if self._decode else self._start

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Most positions a row may hold."""
        return self.context

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """Key length and offset of the masks (unused: masks are passed ready-made)."""
        if self._decode:
            return self._length, 0
        return self._start + query_length, 0

    # ---- internals ----------------------------------------------------------------------------------------------

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads = key_states.shape[1]
        shape_k = (self.slots, heads, self.allocated, key_states.shape[-1])
        shape_v = (self.slots, heads, self.allocated, value_states.shape[-1])
        self._keys.append(torch.zeros(shape_k, dtype=key_states.dtype, device=self.device))
        self._values.append(torch.zeros(shape_v, dtype=value_states.dtype, device=self.device))

    def _reserve(self, length: int) -> None:
        """Make rows hold ``length`` positions: memory follows the longest sequence so far, not the context."""
        if length <= self.allocated:
            return
        if length > self.context:
            raise ValueError(f"a sequence needs {length} positions but the cache holds {self.context}")
        size = min(self.context, max(length, 2 * self.allocated))
        for layers in (self._keys, self._values):
            for index, old in enumerate(layers):
                grown = torch.zeros((*old.shape[:2], size, old.shape[3]), dtype=old.dtype, device=self.device)
                grown[:, :, : self.allocated] = old
                layers[index] = grown
        self.allocated = size

    def _decode_index(self, heads: int) -> torch.Tensor:
        """Flat row indices (into ``[slots * heads * context, head_dim]``) of each row's and head's new position."""
        index = self._flat_index.get(heads)
        if index is None:
            n = self._rows
            base = torch.arange(n * heads, device=self.device) * self.allocated
            index = base + self._positions.repeat_interleave(heads)
            self._flat_index[heads] = index
        return index


@dataclass(frozen=True)
class MaskPolicy:
    """How to build the 4D attention masks a model takes as they are.

    ``additive`` is the dtype of additive (0 / minimum) masks for attention implementations that add the mask to
    the scores (eager); None means boolean masks (SDPA). ``windows`` maps layer types to their sliding window (None
    for full attention) for models that take one mask per layer type; ``window`` is the sliding window of models
    that take a single mask.
    """

    additive: torch.dtype | None = None
    windows: dict[str, int | None] | None = None
    window: int | None = None

    def decode(self, positions: torch.Tensor, length: int) -> Mask:
        """Masks ``[n, 1, 1, length]``: each row sees its positions up to its new token's."""
        kv = torch.arange(length, device=positions.device)[None, :]
        query = positions[:, None]
        allowed = kv <= query
        return self._finish(allowed, kv, query, (positions.shape[0], 1, 1, length))

    def prefill(self, lengths: torch.Tensor, start: int, length: int) -> Mask:
        """Masks ``[m, 1, length, start + length]`` for a (right-padded) prefill from position ``start``.

        Row ``j`` holds ``lengths[j]`` real tokens from ``start``; its padding queries see their own position too,
        so that no query row is empty (an empty row would turn into NaN and poison the cache).
        """
        device = lengths.device
        kv = torch.arange(start + length, device=device)[None, None, :]
        query = (torch.arange(length, device=device) + start)[None, :, None]
        allowed = (kv <= query) & (kv < (lengths + start)[:, None, None])
        allowed |= kv == query
        return self._finish(allowed, kv, query, (lengths.shape[0], 1, length, start + length))

    def _finish(self, allowed: torch.Tensor, kv: torch.Tensor, query: torch.Tensor, shape: tuple[int, ...]) -> Mask:
        if self.windows is None:
            if self.window is not None:
                allowed = allowed & ((kv > query - self.window) | (kv == query))
            return self._form(allowed.view(shape))
        masks: dict[str, torch.Tensor] = {}
        for layer_type, window in self.windows.items():
            mask = allowed if window is None else allowed & ((kv > query - window) | (kv == query))
            masks[layer_type] = self._form(mask.view(shape))
        return masks

    def _form(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.additive is None:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=self.additive, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.additive).min)
