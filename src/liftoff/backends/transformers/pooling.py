"""How an embedding checkpoint turns token states into one vector, read from its sentence-transformers files.

A sentence-transformers directory (``modules.json``) names a ``Pooling`` module (``1_Pooling/config.json``: mean,
CLS, max or last-token pooling), maybe a ``Normalize`` module, and a ``max_seq_length``
(``sentence_bert_config.json``). A plain Hugging Face encoder has none of these: it gets mean pooling, no
normalization, and the tokenizer's or the model's length limit. Liftoff reproduces these modules with torch
rather than running sentence-transformers, so that it can tokenize each input once, on arrival, and report
truncation and token counts per input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class PoolingConfigError(Exception):
    """The checkpoint asks for a pooling this backend does not implement."""


@dataclass(frozen=True)
class PoolingSpec:
    """The pooling of one embedding model."""

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


# sentence-transformers' pooling flags → Liftoff's pooling modes
_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def _pooling_mode(config: dict[str, Any]) -> str:
    asked = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    if len(asked) != 1 or asked[0] not in _FLAGS:
        raise PoolingConfigError(
            f"pooling {', '.join(asked) or 'none'} is not supported; one of {', '.join(_FLAGS)} must be set"
        )
    return _FLAGS[asked[0]]


def read_pooling(path: Path) -> PoolingSpec:
    """The pooling a checkpoint directory declares (defaults for a plain Hugging Face encoder)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return PoolingSpec()
    mode, normalize = "mean", False
    for module in _read_json(modules_file):
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            config_file = path / str(module.get("path", "")) / "config.json"
            if config_file.is_file():
                mode = _pooling_mode(_read_json(config_file))
        elif kind.endswith("Normalize"):
            normalize = True
    length = None
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        length = _read_json(bert_config).get("max_seq_length")
    return PoolingSpec(mode, normalize, int(length) if length else None)


def pool(states: torch.Tensor, mask: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """One vector per row of ``states`` ``[batch, tokens, hidden]``; ``mask`` marks real tokens (right padding)."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    if spec.mode == "cls":
        pooled = states[:, 0]
    elif spec.mode == "max":
        pooled = states.masked_fill(weights == 0, torch.finfo(states.dtype).min).amax(dim=1)
    elif spec.mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        pooled = states[torch.arange(states.shape[0], device=states.device), last]
    else:
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled
