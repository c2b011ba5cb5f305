"""Dequantize a GGUF file once into a normal Hugging Face checkpoint, so that later starts take seconds.

transformers can read GGUF files, but it dequantizes every tensor at each start (12-25 s for SmolLM2-135M), its
``from_pretrained(..., gguf_file=...)`` needs ``accelerate``, and a GGUF-loaded model refuses ``save_pretrained``.
So the conversion is done here with transformers' GGUF readers (config, tokenizer, tensor name mapping and
processors) and the ``gguf`` package's dequantizer, and written with ``safetensors`` in the target dtype:

``<repository_path>/dequantized/<gguf stem>-<file size>-<dtype>/`` holds ``config.json``,
``generation_config.json``, ``model.safetensors`` and the tokenizer files. It is written into a temporary
directory and renamed into place, so a crash never leaves half a checkpoint, and two readers converting the same
file at once both end up using one complete copy.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

MARKER = "liftoff-dequantized.json"


def dequantized_dir(gguf_path: Path, repository_path: Path, dtype: torch.dtype) -> Path:
    """Where the checkpoint converted from ``gguf_path`` in ``dtype`` lives."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)
    dtype_name = str(dtype).removeprefix("torch.")
    return repository_path / "dequantized" / f"{stem}-{gguf_path.stat().st_size}-{dtype_name}"


def ensure_dequantized(
    gguf_path: Path,
    repository_path: Path,
    dtype: torch.dtype,
    progress: Callable[[float], None] | None = None,
) -> Path:
    """The converted checkpoint of ``gguf_path``: reused when it exists, else converted now (blocking)."""
    target = dequantized_dir(gguf_path, repository_path, dtype)
    if (target / MARKER).is_file():
        logger.info("using the dequantized checkpoint %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("dequantizing %s into %s (once)", gguf_path, target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf_path, work, dtype, progress)
        for path in (work, *work.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            work.rename(target)
        except OSError as exc:
            if not (target / MARKER).is_file():  # not another reader's finished copy: a real failure
                raise OSError(
                    f"cannot put the converted checkpoint at {target} ({exc}); remove that directory"
                ) from exc
            logger.info("another process converted %s first; using its copy", gguf_path.name)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def convert_gguf(
    gguf_path: Path, out: Path, dtype: torch.dtype, progress: Callable[[float], None] | None = None
) -> None:
    """Write the Hugging Face checkpoint of ``gguf_path`` (dequantized to ``dtype``) into the directory ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report = progress or (lambda fraction: None)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    report(0.2)
    auto: Any = AutoModelForCausalLM  # ``from_config`` is untyped
    with torch.device("meta"):  # the model's parameter names and shapes, without allocating or initialising
        skeleton = auto.from_config(config)
    tensors = _dequantize(gguf_path, skeleton, config.to_dict(), dtype, lambda f: report(0.2 + 0.5 * f))
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected -= {"lm_head.weight"}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(
            f"{gguf_path.name}: the GGUF file lacks {len(missing)} tensors of {type(skeleton).__name__} "
            f"(e.g. {', '.join(missing[:3])}); this architecture cannot be converted"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    report(0.85)
    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), {"format": "pt"})
    tokenizer.save_pretrained(out)
    source = {"source": str(gguf_path), "size": gguf_path.stat().st_size, "dtype": str(dtype)}
    (out / MARKER).write_text(json.dumps(source, indent=2) + "\n")
    report(1.0)


def _dequantize(
    gguf_path: Path,
    skeleton: torch.nn.Module,
    config: dict[str, Any],
    dtype: torch.dtype,
    progress: Callable[[float], None],
) -> dict[str, torch.Tensor]:
    """Every tensor of the file that the model has, dequantized and renamed to the model's parameter names."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(gguf_path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    processor_class: Any = TENSOR_PROCESSORS.get(architecture, TensorProcessor)  # untyped in transformers
    processor = processor_class(config=config)
    names = _name_map(skeleton, processor, {t.name for t in reader.tensors})
    # Some processors (mixtures of experts) store tensors into ``parsed["tensors"]`` themselves.
    parsed: dict[str, Any] = {"config": config, "tensors": {}}
    total = len(reader.tensors)
    for index, tensor in enumerate(reader.tensors):
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name in names:
            array = np.array(result.weights)  # a writable copy (the file is mapped read-only)
            parsed["tensors"][names[result.name]] = torch.from_numpy(array).to(dtype)
        progress((index + 1) / total)
    return {name: value.to(dtype) for name, value in parsed["tensors"].items()}


class _Flat:
    """A model seen without its children: transformers' name mapping then runs once instead of once per module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = getattr(model, "config", None)
        self._keys = dict.fromkeys(model.state_dict())

    def state_dict(self) -> dict[str, None]:
        return self._keys

    def named_children(self) -> list[tuple[str, torch.nn.Module]]:
        return []


def _name_map(skeleton: torch.nn.Module, processor: Any, gguf_names: set[str]) -> dict[str, str]:
    """GGUF tensor name -> model parameter name (the quick flat pass; the full recursive one if it falls short)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    names: dict[str, str] = get_gguf_hf_weights_map(_Flat(skeleton), processor)
    if gguf_names - set(names) - {"rope_freqs.weight"}:
        names = get_gguf_hf_weights_map(skeleton, processor)
    return names
