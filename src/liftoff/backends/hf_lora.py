"""LoRA adapters for the transformers backend, applied per row of a batched step (reader option ``loras``).

One reader holds one base model and many PEFT-format adapters (a directory with ``adapter_config.json`` and
``adapter_model.safetensors``); each request picks one by ``lora_id``, or none. The adapters are never merged
into the base weights and a step is never run once per adapter: every targeted linear layer (whatever module is
there, an ``nn.Linear`` or an int8 layer of :mod:`liftoff.backends.hf_int8`) is wrapped in a :class:`LoraLinear`
that adds ``scale * (x @ A.T) @ B.T`` of each row's own adapter to the base output.

How the rows get their adapters, cheaply: before each forward the backend tells the shared :class:`LoraSet` which
adapter slot each row uses (:meth:`LoraSet.select`). Only the distinct adapters of the step (at most
``max_loras``) take part: each wrapper multiplies the input once by their ``A`` matrices side by side
(``[in, u * r]``), a per-row mask keeps each row's own block of ``r`` columns (zeros elsewhere, which is exact),
and one product by their stacked ``B`` matrices (scale folded in) gives every row its own delta. The side-by-side
matrices are rebuilt only when the set of adapters in the step changes. Different ranks are zero-padded to the
largest, which changes nothing. A step whose rows use no adapter skips all of this, so the base model's output is
bit for bit what it is without ``loras``; a row without an adapter in a mixed step gets ``+ 0.0``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from liftoff.backends.lora_files import CONFIG_FILE, WEIGHTS_FILE, LoraLoadError, find_adapter
from liftoff.config.models import DEFAULT_MAX_LORAS, ReaderConfig, lora_entries
from liftoff.core.errors import InvalidRequestError, NotSupportedError

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True)
class Adapter:
    """One adapter read from disk: per targeted module (its path in the model), ``A`` [r, in] and ``scale * B``."""

    name: str
    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())


def read_adapter(name: str, path: Path) -> Adapter:
    """Read a PEFT LoRA adapter; refuse (naming the adapter) what this code does not apply exactly."""
    alpha, rslora = _read_config(name, path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise LoraLoadError(f"LoRA {name!r}: cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoraLoadError(f"LoRA {name!r}: weight {key!r} is not a lora_A/lora_B matrix; it cannot be applied")
        parts.setdefault(match["module"], {})[match["which"]] = tensor
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in parts.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraLoadError(f"LoRA {name!r}: {module} lacks a matching lora_A [r, in] and lora_B [out, r]")
        rank = a.shape[0]  # rank_pattern gives some modules their own rank: the matrices say which
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[module] = (a.float(), b.float() * scale)
    if not modules:
        raise LoraLoadError(f"LoRA {name!r}: {path / WEIGHTS_FILE} holds no LoRA weights")
    return Adapter(name, path, modules)


# adapter_config.json keys whose features this code does not apply: set (truthy), the adapter is refused
_UNSUPPORTED = ("use_dora", "modules_to_save", "alpha_pattern", "layer_replication", "lora_bias",
                "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora")  # fmt: skip


def _read_config(name: str, path: Path) -> tuple[float, bool]:
    """``lora_alpha`` and ``use_rslora`` of an adapter's config, after refusing what is not plain LoRA."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraLoadError(f"LoRA {name!r}: cannot read {path / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise LoraLoadError(f"LoRA {name!r}: {path / CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraLoadError(f"LoRA {name!r}: peft_type {kind!r} is not LORA; only LoRA adapters are served")
    refused = [key for key in _UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") not in (None, "none"):
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise LoraLoadError(f"LoRA {name!r}: {', '.join(refused)} in {CONFIG_FILE} is not supported; retrain without")
    return float(config.get("lora_alpha") or config.get("r") or 8), bool(config.get("use_rslora"))


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


@dataclass(frozen=True)
class _Step:
    """The adapters of one forward: the distinct slots used (ascending) and each row's mask over their columns."""

    used: tuple[int, ...]
    mask: torch.Tensor  # [rows, len(used) * rank]: ones over the row's own adapter's columns


class LoraSet:
    """The adapters of one reader, wrapped into its model: names to slots, and the rows' slots for each forward."""

    def __init__(self, model: torch.nn.Module, adapters: list[Adapter], max_loras: int) -> None:
        self.names = [adapter.name for adapter in adapters]
        self.max_loras = max_loras
        self.step: _Step | None = None
        self._slots = {adapter.name: slot for slot, adapter in enumerate(adapters, start=1)}
        self.rank = max(adapter.rank for adapter in adapters)
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        targets = sorted({module for adapter in adapters for module in adapter.modules})
        for module_name in targets:
            self._wrap(model, module_name, adapters)
        self.wrapped = len(targets)

    def _wrap(self, model: torch.nn.Module, module_name: str, adapters: list[Adapter]) -> None:
        users = [adapter for adapter in adapters if module_name in adapter.modules]
        try:
            base = model.get_submodule(module_name)
        except AttributeError:
            raise LoraLoadError(
                f"LoRA {users[0].name!r} targets {module_name}, which this model does not have: the adapter was "
                "trained on another architecture"
            ) from None
        first_a, first_b = users[0].modules[module_name]
        size_in = int(getattr(base, "in_features", first_a.shape[1]))
        size_out = int(getattr(base, "out_features", first_b.shape[0]))
        a = torch.zeros(len(adapters) + 1, size_in, self.rank, dtype=self._dtype)
        b = torch.zeros(len(adapters) + 1, self.rank, size_out, dtype=self._dtype)
        for slot, adapter in enumerate(adapters, start=1):
            if module_name not in adapter.modules:
                continue
            lora_a, lora_b = adapter.modules[module_name]
            if lora_a.shape[1] != size_in or lora_b.shape[0] != size_out:
                raise LoraLoadError(
                    f"LoRA {adapter.name!r}: {module_name} is {size_in} -> {size_out} in this model but "
                    f"{lora_a.shape[1]} -> {lora_b.shape[0]} in the adapter: it was trained on another base model"
                )
            a[slot, :, : lora_a.shape[0]] = lora_a.t()
            b[slot, : lora_b.shape[1], :] = lora_b.t()
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(base, self, a.to(self._device), b.to(self._device)))

    def slot(self, lora_id: str | None) -> int:
        """The slot of ``lora_id`` (0: none); an unknown id is a 400 that lists the adapters."""
        if lora_id is None:
            return 0
        slot = self._slots.get(lora_id)
        if slot is None:
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
    lora = LoraSet(model, adapters, config.max_loras or DEFAULT_MAX_LORAS)
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
    adapters (keys and values computed under one adapter are no prefix of another's, nor of the base model's)."""
    return tokens if lora is None else [-1 - slot, *tokens]
