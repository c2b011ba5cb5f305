"""LoRA adapters for the llama.cpp backend: GGUF adapters, PEFT adapters converted once, and who runs with which.

llama.cpp applies LoRA adapters to a whole context, not per row: every row of one ``llama_decode`` runs under the
same adapter set. So the backend groups its rows by adapter and runs one decode per group (see
:meth:`LlamaLoras.groups`): a step with rows of three adapters and rows of the base model costs four passes over
the weights instead of one. ``max_loras`` bounds the adapters that run in one step; when more have running
sequences, the step takes them in turn (rotating, so none starves) and the others wait a step.

An adapter is either a GGUF LoRA file (what llama.cpp's ``convert_lora_to_gguf.py`` writes) or a PEFT directory
(``adapter_config.json`` + ``adapter_model.safetensors``), which is converted once with that same script and
cached under ``<repository_path>/lora-gguf/``. Before converting, the adapter is read and checked by
:func:`liftoff.backends.transformers.lora.read_adapter` (what it cannot apply exactly is refused) and written again with
each module's PEFT scale folded into ``lora_B`` and ``lora_alpha`` 0, which llama.cpp reads as "scale 1". That
way rsLoRA and per-module ranks (``rank_pattern``), which the script does not carry over, give PEFT's numbers.
The script comes from llama.cpp's source tree of the installed llama-cpp-python version (``make setup`` unpacks
it under ``~/.cache/liftoff/peers``), or from the directory the backend option ``llama_cpp_source`` names.
"""

from __future__ import annotations

import abc
import ctypes
import hashlib
import itertools
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import llama_cpp as llama

from liftoff.backends.base import BackendContext
from liftoff.backends.llamacpp.native import NativeContext, NativeModel
from liftoff.backends.lora_files import LoraLoadError, find_adapter
from liftoff.config.loras import DEFAULT_MAX_LORAS
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotFoundError, NotSupportedError

logger = logging.getLogger(__name__)

CONVERTER = "convert_lora_to_gguf.py"
CACHE_DIR = "lora-gguf"
CONVERT_TIMEOUT_S = 600.0
_VERSION = 1  # bump when the conversion changes: it is part of the cache key


def default_source_dir() -> Path:
    """Where ``make setup`` unpacks llama.cpp's source for the installed llama-cpp-python version."""
    version = getattr(llama, "__version__", "unknown")
    return Path.home() / ".cache" / "liftoff" / "peers" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def adapter_file(
    name: str, source: str, base: Path, repository_path: Path, *, token: str | None, source_dir: Path | None
) -> Path:
    """The GGUF LoRA file of adapter ``name`` given as ``source`` (one entry of ``loras``): a ``.gguf`` file as
    it is, or a PEFT adapter directory converted for the base model ``base`` (once; cached)."""
    for candidate in (Path(source).expanduser(), repository_path / source):
        if candidate.is_file():
            if candidate.suffix.lower() != ".gguf":
                raise LoraLoadError(f"LoRA {name!r}: {candidate} is a file but not a .gguf LoRA adapter")
            return candidate
    peft_dir = find_adapter(name, source, repository_path, token)
    return converted(name, peft_dir, base, repository_path, source_dir or default_source_dir())


def converted(name: str, peft_dir: Path, base: Path, repository_path: Path, source_dir: Path) -> Path:
    """The GGUF conversion of the PEFT adapter at ``peft_dir`` for the base GGUF model ``base``, made if missing."""
    key = _digest(peft_dir, base)
    target = repository_path / CACHE_DIR / f"{name}-{key}.gguf"
    if key and target.is_file():
        return target  # converted from these very files, which were checked then: no torch, no second read

    from liftoff.backends.transformers.lora import read_adapter  # torch: only when a PEFT adapter is converted

    adapter = read_adapter(name, peft_dir)  # refuses what cannot be applied exactly, before converting anything
    if not key:  # read_adapter could, the digest could not: no cache name to trust
        raise LoraLoadError(f"LoRA {name!r}: cannot read the files of {peft_dir}; check their permissions")
    script = source_dir / CONVERTER
    if not script.is_file():
        raise LoraLoadError(
            f"LoRA {name!r}: {peft_dir} is a PEFT adapter, which llama.cpp loads only as GGUF, and llama.cpp's "
            f"converter is not at {script}: run `make setup` (it unpacks llama.cpp's source there), set "
            "backend_options.llama_cpp_source to a llama.cpp source directory, or give the adapter as a .gguf file"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as work:
        _convert(adapter, base, script, Path(work), target)
    logger.info("LoRA %s: converted %s to %s", name, peft_dir, target)
    return target


def _digest(peft_dir: Path, base: Path) -> str:
    """The cache key of a conversion: the adapter's files, the base model, this code's version ("" when a file
    cannot be read: :func:`read_adapter` then says what is wrong)."""
    digest = hashlib.sha256()
    try:
        for part in (peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"):
            digest.update(part.read_bytes())
    except OSError:
        return ""
    digest.update(f"{base.name}:{base.stat().st_size}:{_VERSION}".encode())
    return digest.hexdigest()[:16]


def _convert(adapter: Any, base: Path, script: Path, work: Path, target: Path) -> None:
    """Write ``adapter`` (scales folded into B) as PEFT files, run llama.cpp's converter, move the result in."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folded = work / "adapter"
    folded.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in adapter.modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folded / "adapter_model.safetensors"))
    lora_config = {"peft_type": "LORA", "r": adapter.rank, "lora_alpha": 0.0, "target_modules": sorted(adapter.modules)}
    (folded / "adapter_config.json").write_text(json.dumps(lora_config))
    base_config = work / "base"  # the converter maps tensor names by the base model's architecture
    config = AutoConfig.from_pretrained(str(base.parent), gguf_file=base.name)
    config.architectures = config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(base_config)
    out = work / "adapter.gguf"
    command = [sys.executable, str(script), "--outtype", "f32", "--base", str(base_config), "--outfile", str(out)]
    try:
        done = subprocess.run(
            [*command, str(folded)], capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise LoraLoadError(f"LoRA {adapter.name!r}: conversion to GGUF took over {CONVERT_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LoraLoadError(
            f"LoRA {adapter.name!r}: llama.cpp's {CONVERTER} could not convert it for this model: {' | '.join(tail)}"
        )
    out.replace(target)


@dataclass(eq=False)
class _Adapter:
    """One loaded adapter: ``key`` is never reused, so KV cached under a removed adapter matches no new one."""

    key: int
    name: str
    path: Path
    pointer: Any
    running: int = 0
    removed: bool = False


S = TypeVar("S")


class LlamaLoras:
    """A reader's adapters on one llama.cpp model and context: names to keys, running counts, the context's
    adapter. Engine thread only (and the loading thread before the first step)."""

    def __init__(self, model_pointer: Any, context_pointer: Any, max_loras: int) -> None:
        self._model = model_pointer
        self._context = context_pointer
        self.max_loras = max_loras
        self._by_key: dict[int, _Adapter] = {}
        self._by_name: dict[str, _Adapter] = {}
        self._keys = itertools.count(1)
        self._turn = 0
        self._current = 0  # the key of the adapter on the context (0: none)

    def names(self) -> list[str]:
        """The adapters a request may name now, in the order they were added."""
        return list(self._by_name)

    def add(self, name: str, path: Path) -> None:
        """Load a GGUF LoRA file as adapter ``name`` (engine thread, or before the first step)."""
        if name in self._by_name:
            raise InvalidRequestError(f"LoRA {name!r} is already an adapter of this reader", param="name")
        pointer = llama.llama_adapter_lora_init(self._model, str(path).encode())
        if not pointer:
            raise LoraLoadError(f"LoRA {name!r}: llama.cpp could not load {path} as a LoRA adapter of this model")
        adapter = _Adapter(next(self._keys), name, path, pointer)
        self._by_key[adapter.key] = adapter
        self._by_name[name] = adapter

    def key(self, lora_id: str | None) -> int:
        """The key of a request's ``lora_id`` (0: the base model); a 400 that lists the adapters when unknown."""
        if lora_id is None:
            return 0
        adapter = self._by_name.get(lora_id)
        if adapter is None:
            held = ", ".join(self._by_name) or "none"
            raise InvalidRequestError(
                f"lora_id {lora_id[:128]!r} is not an adapter of this reader; it has: {held}", param="lora_id"
            )
        return adapter.key

    def acquire(self, key: int) -> None:
        """A sequence starts under adapter ``key``."""
        if key:
            self._by_key[key].running += 1

    def release(self, key: int) -> None:
        """A sequence under adapter ``key`` ended; a removed adapter is freed with its last sequence."""
        if key:
            adapter = self._by_key[key]
            adapter.running -= 1
            if adapter.removed and adapter.running <= 0:
                self._free(adapter)

    def remove(self, name: str) -> None:
        """Refuse new requests for ``name`` from now; free it when its running sequences have ended."""
        adapter = self._by_name.pop(name, None)
        if adapter is None:
            held = ", ".join(self._by_name) or "none"
            raise NotFoundError(f"LoRA {name!r} is not an adapter of this reader; it has: {held}", param="name")
        adapter.removed = True
        if adapter.running <= 0:
            self._free(adapter)

    def _free(self, adapter: _Adapter) -> None:
        del self._by_key[adapter.key]
        if self._current == adapter.key:
            self.use(0)
        llama.llama_adapter_lora_free(adapter.pointer)

    def use(self, key: int) -> None:
        """Put adapter ``key`` (0: none) on the context before a decode; nothing when it is already there."""
        if key == self._current:
            return
        if key:
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(self._by_key[key].pointer)
            scales = (ctypes.c_float * 1)(1.0)
            llama.llama_set_adapters_lora(self._context, adapters, 1, scales)
        else:
            llama.llama_set_adapters_lora(self._context, None, 0, None)
        self._current = key

    def groups(self, rows: list[S], keys: list[int]) -> list[tuple[int, list[S]]]:
        """``rows`` (under adapters ``keys``) as (key, rows) groups, one per adapter, in row order within each:
        the base model's rows and at most ``max_loras`` adapters, taken in turn when more are running.

        The adapter already on the context goes first: each change makes llama.cpp re-plan its compute graph at
        the next decode (milliseconds), so a step of k groups costs k - 1 changes, not k.
        """
        by_key: dict[int, list[S]] = {}
        for row, key in zip(rows, keys, strict=True):
            by_key.setdefault(key, []).append(row)
        adapters = sorted(key for key in by_key if key)
        if len(adapters) > self.max_loras:
            start = self._turn % len(adapters)
            adapters = (adapters[start:] + adapters[:start])[: self.max_loras]
            self._turn += 1
        chosen = ([0] if 0 in by_key else []) + adapters
        chosen.sort(key=lambda key: key != self._current)  # stable: the rest keep their order
        return [(key, by_key[key]) for key in chosen]

    def order(self, key: int) -> tuple[bool, int]:
        """A sort key for prompts to prefill: the adapter on the context first, then by adapter."""
        return key != self._current, key

    def close(self) -> None:
        """Free every adapter (before the model is freed)."""
        for adapter in list(self._by_key.values()):
            llama.llama_adapter_lora_free(adapter.pointer)
        self._by_key.clear()
        self._by_name.clear()


class LlamaCppLoraMixin(abc.ABC):
    """The llama.cpp backend's adapter management: the ``GenerativeBackend`` LoRA interface over :class:`LlamaLoras`."""

    config: ReaderConfig
    context: BackendContext
    options: dict[str, Any]
    loras: LlamaLoras | None

    @abc.abstractmethod
    def _loaded(self) -> tuple[NativeModel, NativeContext]:
        """The loaded model and context (raises when not loaded)."""

    def _adapter_key(self, lora_id: str | None) -> int:
        """The adapter key of a request's ``lora_id`` (0: the base model); a 400 naming the reader's adapters."""
        if lora_id is None:
            return 0
        if self.loras is None:
            raise NotSupportedError(
                f"lora_id {lora_id[:128]!r}: this reader has no LoRA adapters (reader option loras)", param="lora_id"
            )
        return self.loras.key(lora_id)

    def load_lora(self, name: str, source: str) -> object:
        """The GGUF file of adapter ``name`` (a PEFT adapter is converted first, once): slow, any thread."""
        _model, _ = self._loaded()
        resolved = self.context.model
        assert resolved is not None
        source_dir = self.options.get("llama_cpp_source")
        return name, adapter_file(
            name,
            source,
            resolved.path,
            self.context.repository_path,
            token=self.config.access_token,
            source_dir=Path(str(source_dir)).expanduser() if source_dir else None,
        )

    def install_lora(self, loaded: object) -> None:
        """Load the adapter's GGUF file into llama.cpp and make it selectable (engine thread, between steps)."""
        model, ctx = self._loaded()
        name, path = cast(tuple[str, Path], loaded)
        if self.loras is None:
            self.loras = LlamaLoras(model.pointer, ctx.pointer, self.config.max_loras or DEFAULT_MAX_LORAS)
        self.loras.add(name, path)

    def remove_lora(self, name: str) -> None:
        """New requests for ``name`` are refused from now; it is freed when its running sequences have ended."""
        if self.loras is None:
            raise NotFoundError(f"LoRA {name!r} is not an adapter of this reader; it has: none", param="name")
        self.loras.remove(name)

    def lora_names(self) -> list[str]:
        """The adapters a request may name now."""
        return self.loras.names() if self.loras is not None else []
