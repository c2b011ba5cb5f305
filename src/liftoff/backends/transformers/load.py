"""Loading a causal LM for the transformers backend: options, architecture checks, model, tokenizer and masks."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from liftoff.backends.transformers.cache import MaskPolicy

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEFAULT_CONTEXT = 2048
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


class ModelLoadError(Exception):
    """The model cannot be served by the transformers backend; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, and what the backend needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    max_positions: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    masks: MaskPolicy


def resolve_dtype(value: object, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """``backend_options["dtype"]``: ``auto`` (the default), bfloat16, float32 or float16.

    ``auto`` is the ``auto`` argument when given (int8 products need float32). Otherwise it is bfloat16 on CUDA
    and on CPUs with AMX tiles, float32 on other CPUs: without AMX, torch's bf16 matrix products on CPU run at
    about half the fp32 speed (measured on AVX512-BF16 Xeons: 167 against 329 GFLOP/s for a 3200 x 576 x 1536
    product), so bf16 only saves memory there.
    """
    name = "auto" if value is None else str(value).lower().removeprefix("torch.")
    if name == "auto":
        if auto is not None:
            return auto
        return torch.bfloat16 if device.type == "cuda" or cpu_has_amx() else torch.float32
    dtype = DTYPES.get(name)
    if dtype is None:
        raise ModelLoadError(f"backend_options dtype={value!r} is not one of: auto, bfloat16, float32, float16")
    return dtype


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Linux: from /proc/cpuinfo; elsewhere: assume not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_device(device: str) -> torch.device:
    """The reader's ``device`` as a torch device; CUDA must be there when asked for."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA device on this machine")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"the transformers backend runs on 'cpu' or 'cuda', not {device!r}")


def set_threads(value: object) -> int:
    """``torch.set_num_threads`` from ``backend_options["n_threads"]`` (default: the CPUs this process may use)."""
    if value:
        threads = int(str(value))
    elif hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))
    else:
        threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    return threads


def check_causal(config: PretrainedConfig) -> None:
    """Refuse checkpoints that are not causal language models (embeddings, classifiers, encoders)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        if not any(name in causal for name in architectures):
            raise ModelLoadError(
                f"the checkpoint's architecture {', '.join(architectures)} is not a causal language model; the "
                "transformers backend serves text generation only (embedding and classification come later)"
            )
    elif config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"model type {config.model_type!r} has no causal language model in transformers")


def mask_policy(config: PretrainedConfig, attention: str, dtype: torch.dtype) -> MaskPolicy:
    """The masks this model needs: per layer type (sliding windows) and boolean (SDPA) or additive (eager)."""
    additive = None if attention == "sdpa" else dtype
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = set(layer_types)
        unknown = kinds - _ATTENTION_LAYERS
        if unknown:
            raise ModelLoadError(
                f"layers of type {', '.join(sorted(unknown))} are not supported by the transformers backend's cache"
            )
        if kinds == {"full_attention"} or window is None:
            return MaskPolicy(additive=additive)
        return MaskPolicy(additive=additive, windows={"full_attention": None, "sliding_attention": int(window)})
    if window is not None and getattr(config, "use_sliding_window", True):
        return MaskPolicy(additive=additive, window=int(window))
    return MaskPolicy(additive=additive)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    found: list[int] = []
    sources: list[Any] = [tokenizer.eos_token_id, model.config.eos_token_id]
    if model.generation_config is not None:
        sources.append(model.generation_config.eos_token_id)
    for source in sources:
        values = source if isinstance(source, list | tuple) else [source]
        found.extend(int(v) for v in values if v is not None and int(v) not in found)
    return tuple(found)


def _from_pretrained(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except ValueError as exc:  # no SDPA for this architecture: the eager attention takes additive masks
        logger.info("SDPA is not available for %s (%s); using eager attention", path.name, exc)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", local_files_only=True
        )
    return model


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No "Loading weights" bars from transformers in the reader's log while this runs."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_causal_lm(path: Path, *, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load the checkpoint directory ``path`` (config, tokenizer, weights) for serving."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_causal(config)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with no_progress_bars():
        model = _from_pretrained(path, dtype)
    model.requires_grad_(False)
    model = model.to(device) if device.type != "cpu" else model  # type: ignore[arg-type]
    model.train(False)
    attention = str(model.config._attn_implementation)
    masks = mask_policy(model.config, attention, dtype)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    positions = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_positions=int(positions) if positions else None,
        eos_ids=eos,
        pad_id=int(pad),
        masks=masks,
    )
