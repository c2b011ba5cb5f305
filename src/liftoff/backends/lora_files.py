"""Where a LoRA adapter's files are, for every backend: a PEFT directory given as a path, a path under
``repository_path``, or a Hugging Face id (``org/name``: the one rule, :func:`liftoff.config.loras.is_lora_hub_id`,
that the management API's check of what it may load applies too). Free of torch, so a llama.cpp reader imports it
cheaply.
"""

from __future__ import annotations

from pathlib import Path

from liftoff.backends.resolve import hub_snapshot
from liftoff.config.loras import is_lora_hub_id

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoraLoadError(Exception):
    """An adapter cannot be served on this model; the message names it and says why."""


def find_adapter(name: str, source: str, repository_path: Path, token: str | None = None) -> Path:
    """The directory of adapter ``name`` given as ``source``: a path, a path under ``repository_path``, or a
    Hugging Face id (from the hub's cache under ``repository_path``, downloaded when the hub can be reached)."""
    for candidate in (Path(source).expanduser(), repository_path / source):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
        if candidate.exists():
            raise LoraLoadError(f"LoRA {name!r}: {candidate} has no {CONFIG_FILE} (a PEFT adapter directory)")
    if not is_lora_hub_id(source):
        raise LoraLoadError(
            f"LoRA {name!r}: no adapter directory at {source} (nor under repository_path {repository_path}); "
            f"an adapter is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )

    def unreachable(cache: Path) -> LoraLoadError:
        return LoraLoadError(
            f"LoRA {name!r}: {source!r} is not a local adapter directory, not downloaded into {cache}, and the "
            f"Hugging Face hub cannot be reached; put its files at {repository_path / source}"
        )

    return hub_snapshot(source, repository_path, token, unreachable)
