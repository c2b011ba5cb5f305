"""The transformers backend's side of adding and removing LoRA adapters on a running reader.

:class:`LoraRuntime` gives :class:`~liftoff.backends.transformers.backend.TransformersBackend` the four
:class:`~liftoff.backends.base.GenerativeBackend` methods: :meth:`~LoraRuntime.load_lora` reads and checks the adapter
and converts it to the model's device and dtype on the caller's thread (the reader runs it on a thread of its own, so
running streams keep flowing), and :meth:`~LoraRuntime.install_lora` and :meth:`~LoraRuntime.remove_lora` change the
:class:`~liftoff.backends.transformers.lora.LoraSet` on the engine thread between steps, which is cheap. A reader
started without ``loras`` gets its :class:`LoraSet` with its first adapter (``max_loras`` applies then too).
"""

from __future__ import annotations

import torch

from liftoff.backends.base import BackendContext
from liftoff.backends.lora_files import LoraLoadError
from liftoff.backends.transformers.lora import LoraSet, PreparedAdapter, find_adapter, prepare_adapter, read_adapter
from liftoff.config.loras import DEFAULT_MAX_LORAS
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotFoundError


class LoraRuntime:
    """Runtime LoRA changes for a backend that holds its adapters in ``self.lora`` (a mixin)."""

    lora: LoraSet | None
    config: ReaderConfig
    context: BackendContext

    def _lora_model(self) -> torch.nn.Module:
        """The loaded model the adapters wrap."""
        raise NotImplementedError

    def _lora_slots_in_use(self) -> set[int]:
        """The adapter slots of every sequence the backend holds (waiting or running)."""
        raise NotImplementedError

    def _lora_started(self) -> None:
        """The reader had no adapters and gets its first: what was cached without an adapter's mark is stale."""

    def load_lora(self, name: str, source: str) -> object:
        """Find, read and check adapter ``name`` from ``source``; a 400 naming it when it cannot be served."""
        model = self._lora_model()
        try:
            path = find_adapter(name, source, self.context.repository_path, self.config.access_token)
            return prepare_adapter(model, read_adapter(name, path))
        except LoraLoadError as exc:
            raise InvalidRequestError(str(exc), param="path") from exc
        except (OSError, ValueError, RuntimeError) as exc:  # an unreadable file, a tensor that will not convert
            raise InvalidRequestError(f"LoRA {name!r}: cannot be loaded from {source[:256]!r}: {exc}",
                                      param="path") from exc  # fmt: skip

    def install_lora(self, loaded: object) -> None:
        """Install what :meth:`load_lora` returned (engine thread, between steps)."""
        if not isinstance(loaded, PreparedAdapter):
            raise TypeError(f"install_lora takes what load_lora returned, not {type(loaded).__name__}")
        if self.lora is None:
            self.lora = LoraSet(self._lora_model(), self.config.max_loras or DEFAULT_MAX_LORAS)
            self._lora_started()
        with torch.no_grad():  # normal tensors (not inference ones), changed in place later
            self.lora.add(loaded)

    def remove_lora(self, name: str) -> None:
        """Refuse ``name`` to new requests now; free its slot when its last sequence ends (engine thread)."""
        if self.lora is None:
            raise NotFoundError(f"LoRA {name[:128]!r} is not an adapter of this reader; it has none", param="name")
        self.lora.remove(name)
        self._release_loras()

    def lora_names(self) -> list[str]:
        """The adapters a request may name now."""
        lora = self.lora
        return list(lora.names) if lora is not None else []

    def _release_loras(self) -> None:
        """Free the slots of removed adapters whose last sequence has ended (engine thread, between steps)."""
        lora = self.lora
        if lora is not None and lora.retiring:
            with torch.no_grad():  # normal tensors (not inference ones), changed in place later
                lora.release(self._lora_slots_in_use())
