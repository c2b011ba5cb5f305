"""LoRA adapters for the transformers backend, applied per row of a batched step (reader option ``loras``).

One reader holds one base model and many PEFT-format adapters (a directory with ``adapter_config.json`` and
``adapter_model.safetensors``); each request picks one by ``lora_id``, or none. The adapters are never merged
into the base weights and a step is never run once per adapter: every targeted linear layer (whatever module is
there, an ``nn.Linear`` or an int8 layer of :mod:`liftoff.backends.transformers.int8`) is wrapped in a
:class:`LoraLinear` that adds ``scale * (x @ A.T) @ B.T`` of each row's own adapter to the base output.

How the rows get their adapters, cheaply: before each forward the backend tells the shared :class:`LoraSet` which
adapter slot each row uses (:meth:`LoraSet.select`). Only the distinct adapters of the step (at most
``max_loras``) take part: each wrapper multiplies the input once by their ``A`` matrices side by side
(``[in, u * r]``), a per-row mask keeps each row's own block of ``r`` columns (zeros elsewhere, which is exact),
and one product by their stacked ``B`` matrices (scale folded in) gives every row its own delta. The side-by-side
matrices are rebuilt only when the set of adapters in the step changes. Different ranks are zero-padded to the
largest, which changes nothing. A step whose rows use no adapter skips all of this, so the base model's output is
bit for bit what it is without ``loras``; a row without an adapter in a mixed step gets ``+ 0.0``.

Adapters come and go at runtime (``POST`` and ``DELETE /reader/{id}/loras``): :func:`prepare_adapter` does the
slow part anywhere (reading, checking against the model, converting to its device and dtype), then
:meth:`LoraSet.add` installs it on the engine thread between steps, into a free slot (the buffers grow by a slot,
and to a larger rank, when needed; layers no adapter targeted before are wrapped then). :meth:`LoraSet.remove`
makes a name unknown to new requests at once, while the rows already running under it keep its slot; the slot is
zeroed and freed (:meth:`LoraSet.release`) when the last of them ends, and the buffers shrink back to what the
remaining adapters need. Each installed adapter has a serial number of its own (:meth:`LoraSet.mark`), which keys
the prefix cache, so that a slot used again by another adapter never reuses the keys and values of the first.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from liftoff.backends.lora_files import LoraLoadError, find_adapter
from liftoff.backends.transformers.lora_weights import Adapter, read_adapter
from liftoff.config.loras import DEFAULT_MAX_LORAS, MAX_LORAS, lora_entries
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotFoundError, NotSupportedError

__all__ = ["Adapter", "LoraLinear", "LoraLoadError", "LoraSet", "PreparedAdapter", "attach_loras", "find_adapter",
           "fits", "lora_slot", "prefix_key", "prepare_adapter", "read_adapter"]  # fmt: skip

logger = logging.getLogger(__name__)


class LoraLinear(torch.nn.Module):
    """A model's linear layer (``base``: any module mapping ``[..., in]`` to ``[..., out]``) plus the rows' LoRA."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, base: torch.nn.Module, lora: LoraSet, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.lora = lora
        self.in_features, self.out_features = int(a.shape[1]), int(b.shape[2])
        self.register_buffer("a", a, persistent=False)  # [slots, in, r]: slot 0 (no adapter) is zeros
        self.register_buffer("b", b, persistent=False)  # [slots, r, out], the scale folded in
        self._key: tuple[int, ...] = ()
        self._a_cat = self._b_cat = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        step = self.lora.step
        if step is None:
            return out
        if step.used != self._key:  # the adapters in the step changed: their matrices side by side
            used = torch.tensor(step.used, dtype=torch.long, device=self.a.device)
            units, rank = len(step.used), int(self.a.shape[2])
            self._a_cat = self.a[used].permute(1, 0, 2).reshape(self.in_features, units * rank).contiguous()
            self._b_cat = self.b[used].reshape(units * rank, self.out_features).contiguous()
            self._key = step.used
        mask = step.mask if x.dim() == 2 else step.mask.view(step.mask.shape[0], *([1] * (x.dim() - 2)), -1)
        delta = ((x @ self._a_cat) * mask) @ self._b_cat
        return out + delta

    def resize(self, slots: int, rank: int) -> None:
        """Reallocate the buffers for ``slots`` slots of rank ``rank``, keeping what fits (engine thread)."""
        keep_s, keep_r = min(slots, int(self.a.shape[0])), min(rank, int(self.a.shape[2]))
        a = self.a.new_zeros(slots, self.in_features, rank)
        b = self.b.new_zeros(slots, rank, self.out_features)
        a[:keep_s, :, :keep_r] = self.a[:keep_s, :, :keep_r]
        b[:keep_s, :keep_r, :] = self.b[:keep_s, :keep_r, :]
        self.a, self.b = a, b
        self.forget()

    def forget(self) -> None:
        """Drop the side-by-side matrices: a slot's contents changed."""
        self._key = ()
        self._a_cat = self._b_cat = torch.empty(0)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against a model and converted to its device and dtype: per module ``A.T`` [in, r] and
    ``scale * B.T`` [r, out], ready for :meth:`LoraSet.add` (which only copies them into place)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


@dataclass(frozen=True)
class _Held:
    """What a slot holds: the adapter's name, rank and modules (to shrink the buffers when it leaves)."""

    name: str
    rank: int
    modules: frozenset[str]
    mark: int


def _features(module: torch.nn.Module) -> tuple[int | None, int | None]:
    """A linear layer's input and output sizes (of the layer a :class:`LoraLinear` wraps)."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    size_in, size_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (int(size_in) if size_in is not None else None), (int(size_out) if size_out is not None else None)


def prepare_adapter(model: torch.nn.Module, adapter: Adapter) -> PreparedAdapter:
    """Check ``adapter`` against ``model`` (its layers and their shapes) and convert its matrices (any thread)."""
    param = next(model.parameters())
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, (lora_a, lora_b) in sorted(adapter.modules.items()):
        try:
            base = model.get_submodule(module_name)
        except AttributeError:
            raise LoraLoadError(
                f"LoRA {adapter.name!r} targets {module_name}, which this model does not have: the adapter was "
                "trained on another architecture"
            ) from None
        size_in, size_out = _features(base)
        size_in = int(lora_a.shape[1]) if size_in is None else size_in
        size_out = int(lora_b.shape[0]) if size_out is None else size_out
        if lora_a.shape[1] != size_in or lora_b.shape[0] != size_out:
            raise LoraLoadError(
                f"LoRA {adapter.name!r}: {module_name} is {size_in} -> {size_out} in this model but "
                f"{lora_a.shape[1]} -> {lora_b.shape[0]} in the adapter: it was trained on another base model"
            )
        a_t = lora_a.t().to(device=param.device, dtype=param.dtype).contiguous()
        b_t = lora_b.t().to(device=param.device, dtype=param.dtype).contiguous()
        modules[module_name] = (a_t, b_t)
    return PreparedAdapter(adapter.name, modules, adapter.rank)


@dataclass(frozen=True)
class _Step:
    """The adapters of one forward: the distinct slots used (ascending) and each row's mask over their columns."""

    used: tuple[int, ...]
    mask: torch.Tensor  # [rows, len(used) * rank]: ones over the row's own adapter's columns


class LoraSet:
    """The adapters of one reader, wrapped into its model: names to slots, and the rows' slots for each forward.

    Changed only on the engine thread; ``names`` is replaced, never changed in place, so other threads may read it.
    """

    def __init__(self, model: torch.nn.Module, max_loras: int) -> None:
        self.model = model
        self.names: list[str] = []
        self.max_loras = max_loras
        self.step: _Step | None = None
        self.rank = 0
        self._slots: dict[str, int] = {}  # the adapters a request may name
        self._held: dict[int, _Held] = {}  # every slot in memory: those and the removed ones still running
        self._wrapped: dict[str, LoraLinear] = {}
        self._size = 1  # slots in the buffers, slot 0 (no adapter) included
        self._serial = 0
        self.retiring: set[int] = set()  # removed, waiting for their last rows to end
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype

    @property
    def wrapped(self) -> int:
        """How many layers are wrapped."""
        return len(self._wrapped)

    def add(self, adapter: PreparedAdapter) -> int:
        """Install a prepared adapter in a free slot (engine thread, between steps); its slot."""
        if adapter.name in self._slots:
            raise InvalidRequestError(f"LoRA {adapter.name!r} is already an adapter of this reader; remove it first, "
                                      "or give the new one another name", param="name")  # fmt: skip
        if len(self._slots) >= MAX_LORAS:
            raise InvalidRequestError(f"this reader holds {MAX_LORAS} LoRA adapters, the most it may; remove one first",
                                      param="name")  # fmt: skip
        slot = next(s for s in itertools.count(1) if s not in self._held)
        self._fit(max(self._size, slot + 1), max(self.rank, adapter.rank))
        for module_name in adapter.modules:
            if module_name not in self._wrapped:
                self._wrap(module_name)
        for module_name, wrapper in self._wrapped.items():
            pair = adapter.modules.get(module_name)
            if pair is not None:
                a_t, b_t = pair
                wrapper.a[slot, :, : a_t.shape[1]] = a_t
                wrapper.b[slot, : b_t.shape[0], :] = b_t
            wrapper.forget()
        self._serial += 1
        self._held[slot] = _Held(adapter.name, adapter.rank, frozenset(adapter.modules), self._serial)
        self._slots[adapter.name] = slot
        self.names = [*self.names, adapter.name]
        return slot

    def remove(self, name: str) -> int:
        """Make ``name`` unknown to new requests (engine thread); its slot stays until :meth:`release` frees it."""
        slot = self._slots.pop(name, None)
        if slot is None:
            held = ", ".join(self.names) or "none"
            raise NotFoundError(f"LoRA {name[:128]!r} is not an adapter of this reader; it has: {held}", param="name")
        self.names = [other for other in self.names if other != name]
        self.retiring.add(slot)
        return slot

    def release(self, in_use: set[int]) -> None:
        """Free the removed adapters' slots that no row in ``in_use`` runs under any more, and shrink the buffers
        to what the adapters left need (engine thread, between steps)."""
        freed = {slot for slot in self.retiring if slot not in in_use}
        if not freed:
            return
        self.retiring -= freed
        for slot in freed:
            del self._held[slot]
            for wrapper in self._wrapped.values():
                wrapper.a[slot].zero_()
                wrapper.b[slot].zero_()
                wrapper.forget()
        targeted = {module for held in self._held.values() for module in held.modules}
        for module_name in [name for name in self._wrapped if name not in targeted]:
            self._unwrap(module_name)
        self._fit(max(self._held, default=0) + 1, max((held.rank for held in self._held.values()), default=0))

    def _fit(self, size: int, rank: int) -> None:
        """Give every wrapper ``size`` slots of rank ``rank``."""
        if (size, rank) == (self._size, self.rank):
            return
        self._size, self.rank = size, rank
        for wrapper in self._wrapped.values():
            wrapper.resize(size, rank)

    def _wrap(self, module_name: str) -> None:
        base = self.model.get_submodule(module_name)
        size_in, size_out = _features(base)
        if size_in is None or size_out is None:
            raise LoraLoadError(f"{module_name} has no in_features and out_features: it cannot take a LoRA adapter")
        a = torch.zeros(self._size, size_in, self.rank, dtype=self._dtype, device=self._device)
        b = torch.zeros(self._size, self.rank, size_out, dtype=self._dtype, device=self._device)
        wrapper = LoraLinear(base, self, a, b)
        self._replace(module_name, wrapper)
        self._wrapped[module_name] = wrapper

    def _unwrap(self, module_name: str) -> None:
        self._replace(module_name, self._wrapped.pop(module_name).base)

    def _replace(self, module_name: str, module: torch.nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def mark(self, slot: int) -> int:
        """The serial number of the adapter in ``slot`` (0: none), unique for the life of the reader."""
        held = self._held.get(slot) if slot else None
        return held.mark if held is not None else 0

    def slot(self, lora_id: str | None) -> int:
        """The slot of ``lora_id`` (0: none); an unknown id is a 400 that lists the adapters."""
        if lora_id is None:
            return 0
        slot = self._slots.get(lora_id)
        if slot is None:
            if not self.names:
                raise NotSupportedError(f"lora_id {lora_id[:128]!r}: this reader has no LoRA adapters now",
                                        param="lora_id")  # fmt: skip
            raise InvalidRequestError(
                f"lora_id {lora_id[:128]!r} is not an adapter of this reader; it has: {', '.join(self.names)}",
                param="lora_id",
            )
        return slot

    def select(self, slots: list[int]) -> None:
        """Set the slot of each row of the next forward (``slots[i]`` for row ``i``)."""
        used = tuple(sorted({slot for slot in slots if slot}))
        if not used:
            self.step = None
            return
        column = {slot: index for index, slot in enumerate(used)}
        mask = torch.zeros(len(slots), len(used), self.rank, dtype=self._dtype)
        for row, slot in enumerate(slots):
            if slot:
                mask[row, column[slot]] = 1.0
        self.step = _Step(used, mask.view(len(slots), -1).to(self._device))

    def fits(self, active: set[int], slot: int) -> bool:
        """Whether a row of ``slot`` may join a step whose rows use the slots ``active`` (``max_loras``)."""
        return not slot or slot in active or len(active - {0}) < self.max_loras


def attach_loras(model: torch.nn.Module, config: ReaderConfig, repository_path: Path) -> LoraSet | None:
    """Read the adapters of the reader option ``loras`` and wrap them into ``model``: the reader's
    :class:`LoraSet`, or None when it has none."""
    entries = lora_entries(config.loras)
    if not entries:
        return None
    token = config.access_token
    adapters = [read_adapter(name, find_adapter(name, source, repository_path, token)) for name, source in entries]
    lora = LoraSet(model, config.max_loras or DEFAULT_MAX_LORAS)
    for adapter in adapters:
        lora.add(prepare_adapter(model, adapter))
    logger.info("LoRA adapters %s on %d layers (rank up to %d)", ", ".join(lora.names), lora.wrapped, lora.rank)
    return lora


def lora_slot(lora: LoraSet | None, lora_id: str | None) -> int:
    """The slot of a request's ``lora_id`` (0: the base model); a 400 for an adapter the reader does not hold."""
    if lora_id is None:
        return 0
    if lora is None:
        raise NotSupportedError(
            f"lora_id {lora_id[:128]!r}: this reader has no LoRA adapters (reader option loras)", param="lora_id"
        )
    return lora.slot(lora_id)


def fits(lora: LoraSet | None, active: set[int], slot: int) -> bool:
    """Whether a sequence of ``slot`` may join rows of the slots ``active`` within ``max_loras``."""
    return lora is None or lora.fits(active, slot)


def prefix_key(lora: LoraSet | None, slot: int, tokens: list[int]) -> list[int]:
    """``tokens`` as the prefix cache matches them: behind a mark of their adapter when the reader has LoRA
    adapters (keys and values computed under one adapter are no prefix of another's, nor of the base model's).
    The mark is the adapter's serial number, not its slot: a slot used again holds another adapter."""
    return tokens if lora is None else [-1 - lora.mark(slot), *tokens]
