"""Backend selection: a name → ``"module:Class"`` registry, imported lazily (uvicorn's pattern).

Only the selected backend's module is imported, so the gateway and echo readers never import torch.
"""

from __future__ import annotations

import importlib

from liftoff.backends.base import Backend
from liftoff.config.models import ReaderConfig

BACKENDS: dict[str, str] = {
    "echo": "liftoff.backends.echo:EchoBackend",
}


class BackendSelectionError(Exception):
    """No backend can serve this reader's model and device."""


def choose_backend(config: ReaderConfig) -> str:
    """The backend name for a reader: the ``backend`` option, else one chosen from the model."""
    if config.backend:
        if config.backend not in BACKENDS:
            known = ", ".join(sorted(BACKENDS))
            raise BackendSelectionError(f"unknown backend {config.backend!r}; choose one of: {known}")
        return config.backend
    if config.model_name == "echo" or config.model_name.startswith("echo:"):
        return "echo"
    raise BackendSelectionError(
        f"no backend can serve model {config.model_name!r} on device {config.device!r} yet; "
        "use model_name 'echo' or set the backend option"
    )


def create_backend(config: ReaderConfig, default_batch_size: int = 8) -> Backend:
    """Instantiate the backend for a reader (imports its module on first use)."""
    name = choose_backend(config)
    module_name, _, class_name = BACKENDS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(config, default_batch_size)
    return backend
