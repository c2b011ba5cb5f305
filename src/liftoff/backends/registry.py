"""GenerativeBackend selection: a name → ``"module:Class"`` registry, imported lazily (uvicorn's pattern).

Only the selected backend's module is imported, so the gateway and echo readers never import torch. Without a
``backend`` option the choice follows the model: ``echo`` → echo; a GGUF file → llama.cpp on CPU (transformers,
after a one-time dequantization, on CUDA); a Hugging Face checkpoint → transformers, whose class follows what the
checkpoint is (:func:`~liftoff.backends.resolve.checkpoint_kind`): a causal LM, an embedding model or a
sequence classifier. ``device: api`` → the API backend, which forwards to another server.
"""

from __future__ import annotations

import dataclasses
import importlib

from liftoff.backends.base import BackendContext, ModelBackend
from liftoff.backends.resolve import ResolvedModel, checkpoint_kind, resolve_model
from liftoff.config.models import ReaderConfig

BACKENDS: dict[str, str] = {
    "echo": "liftoff.backends.echo:EchoBackend",
    "llamacpp": "liftoff.backends.llamacpp.backend:LlamaCppBackend",
    "transformers": "liftoff.backends.transformers.backend:TransformersBackend",
    "api": "liftoff.backends.api.backend:ApiBackend",
}

# The transformers backend's class for each kind of Hugging Face checkpoint.
TRANSFORMERS_KINDS: dict[str, str] = {
    "EMBEDDING": "liftoff.backends.transformers.encoder:EmbeddingBackend",
    "CLASSIFICATION": "liftoff.backends.transformers.encoder:ClassificationBackend",
}


class BackendSelectionError(Exception):
    """No backend can serve this reader's model and device."""


def _is_echo(config: ReaderConfig) -> bool:
    return config.model_name == "echo" or config.model_name.startswith("echo:")


def _forwards(config: ReaderConfig) -> bool:
    """An API reader: its model lives on another server, so there is nothing to resolve here."""
    return config.backend == "api" or (not config.backend and config.device == "api")


def choose_backend(config: ReaderConfig, model: ResolvedModel | None = None) -> str:
    """The backend name for a reader: the ``backend`` option, else one chosen from the model and device."""
    if config.backend:
        if config.backend not in BACKENDS:
            known = ", ".join(sorted(BACKENDS))
            raise BackendSelectionError(f"unknown backend {config.backend!r}; choose one of: {known}")
        return config.backend
    if _is_echo(config):
        return "echo"
    if config.device == "api":
        return "api"
    if model is None:
        raise BackendSelectionError(f"model {config.model_name!r} must be resolved before choosing its backend")
    if model.format == "gguf" and config.device == "cpu":
        return "llamacpp"
    return "transformers"


def backend_class_path(name: str, model: ResolvedModel | None) -> str:
    """``module:Class`` of a backend name for a model (the transformers backend has a class per model kind)."""
    if name == "transformers" and model is not None and model.format == "hf":
        return TRANSFORMERS_KINDS.get(checkpoint_kind(model.path), BACKENDS[name])
    return BACKENDS[name]


def create_backend(config: ReaderConfig, context: BackendContext | None = None) -> ModelBackend:
    """Resolve the model, choose the backend and instantiate it (importing its module on first use).

    Blocking (it may look for the hub): call it off the event loop.
    """
    context = context or BackendContext()
    if config.backend != "echo" and not _is_echo(config) and not _forwards(config):
        model = resolve_model(config.model_name, context.repository_path, config.access_token)
        context = dataclasses.replace(context, model=model)
    name = choose_backend(config, context.model)
    module_name, _, class_name = backend_class_path(name, context.model).partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: ModelBackend = cls(config, context)
    return backend
