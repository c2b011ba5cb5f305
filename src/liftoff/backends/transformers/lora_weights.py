"""Reading a PEFT LoRA adapter's matrices for the transformers backend, refusing (naming the adapter) what
:mod:`liftoff.backends.transformers.lora` would not apply exactly (where its files are:
:mod:`liftoff.backends.lora_files`).

Reading touches the disk (and maybe the hub) and can take seconds: it runs where it holds nobody up, on the loading
thread at start, or on a thread of its own when an adapter is added to a running reader.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from liftoff.backends.lora_files import CONFIG_FILE, WEIGHTS_FILE, LoraLoadError

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
