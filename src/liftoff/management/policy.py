"""What the management API may start (``POST /reader``): how many readers, how large, and which models.

A caller of ``POST /reader`` may start a bundled model, ``echo``, a model under ``repository_path``, or a Hugging
Face id that ``allowed_models`` lists (downloaded only with ``allow_downloads``; otherwise it must be in
``repository_path`` already). The checks follow the order in which a reader looks for its model (a bundled alias,
the name as a path, the name under ``repository_path``, the hub), so what is checked is what would be loaded.
A refused name gets the same answer whether or not a file of that name exists: the API tells nothing about the
files outside ``repository_path``. An API reader (``device: api``) loads nothing but sends prompts, and the
upstream's key, to its ``api_base``: that URL must match ``allowed_api_bases`` (none by default), and
``access_token_file`` is refused (it would send any file the gateway can read to that URL as a key; the caller
gives ``access_token`` instead). Readers of the configuration (the operator's) are not limited by any of this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from liftoff.config.loras import is_lora_hub_id, lora_entries
from liftoff.config.models import BUNDLED_ALIASES, DEFAULT_API_BASE, AppConfig, ReaderConfig
from liftoff.core.errors import InvalidRequestError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
MAX_BACKEND_OPTIONS_BYTES = 4096


@dataclass(frozen=True)
class ReaderLimits:
    """The limits of ``POST /reader`` (the ``server_config`` keys of the same names)."""

    max_readers: int = 16
    max_batch_size: int = 256
    max_sequence_length: int = 131_072
    repository_path: Path = Path("artefacts")
    allowed_models: tuple[str, ...] = ()
    allow_downloads: bool = False
    allowed_api_bases: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: AppConfig) -> ReaderLimits:
        """The limits a gateway's configuration sets."""
        return cls(config.max_readers, config.max_reader_batch_size, config.max_reader_sequence_length,
                   Path(config.repository_path), config.allowed_models, config.allow_downloads,
                   config.allowed_api_bases)  # fmt: skip


def check_new_reader(config: ReaderConfig, limits: ReaderLimits, running: int) -> None:
    """Refuse (400, naming the setting) a reader ``POST /reader`` may not start while ``running`` readers run."""
    if running >= limits.max_readers:
        raise InvalidRequestError(
            f"this gateway already has {running} readers (max_readers is {limits.max_readers}; dead ones count "
            "until they are deleted); delete one first"
        )
    _check_sizes(config, limits)
    if config.device == "api":
        check_api_reader(config, limits)
        return
    check_model(config, limits)
    check_loras(config, limits)


def check_api_reader(config: ReaderConfig, limits: ReaderLimits) -> None:
    """Refuse an API reader whose upstream is not in ``allowed_api_bases``, or that names a key file (see the
    module docstring): its ``model_name`` is the upstream's model id, nothing is loaded here."""
    base = config.api_base or DEFAULT_API_BASE
    if not any(fnmatchcase(base, pattern) for pattern in limits.allowed_api_bases):
        raise InvalidRequestError(
            f"api_base {base[:256]!r} is not an upstream POST /reader may use: list it (or a pattern) in the "
            "gateway's allowed_api_bases",
            param="api_base",
        )
    if config.access_token_file is not None:
        raise InvalidRequestError(
            "access_token_file is refused for a reader created with POST /reader: give the key as access_token",
            param="access_token_file",
        )


def _check_sizes(config: ReaderConfig, limits: ReaderLimits) -> None:
    sizes = {"max_batch_size": (config.max_batch_size, limits.max_batch_size, "max_reader_batch_size"),
             "max_sequence_length": (config.max_sequence_length, limits.max_sequence_length,
                                     "max_reader_sequence_length"),
             "prefill_chunk_size": (config.prefill_chunk_size, limits.max_sequence_length,
                                    "max_reader_sequence_length")}  # fmt: skip
    for field, (value, limit, key) in sizes.items():
        if value is not None and value > limit:
            raise InvalidRequestError(f"{field} is {value}; a reader created here may have at most {limit} ({key})",
                                      param=field)  # fmt: skip
    options = config.backend_options or {}
    if len(json.dumps(options)) > MAX_BACKEND_OPTIONS_BYTES:
        raise InvalidRequestError(f"backend_options is over {MAX_BACKEND_OPTIONS_BYTES} bytes", param="backend_options")
    for name, value in options.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and not 0 <= value <= limits.max_sequence_length:
            raise InvalidRequestError(
                f"backend_options.{name} is {value}; allowed: from 0 to {limits.max_sequence_length} "
                "(max_reader_sequence_length)",
                param=f"backend_options.{name}",
            )


def _refused(name: str) -> InvalidRequestError:
    aliases = ", ".join(BUNDLED_ALIASES)
    return InvalidRequestError(
        f"model_name {name!r} is not a model POST /reader may start: name a bundled model ({aliases}), echo, a "
        "model under repository_path, or a Hugging Face id that allowed_models lists",
        param="model_name",
    )


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, a directory that cannot be read
        return False


def check_model(config: ReaderConfig, limits: ReaderLimits) -> None:
    """Refuse a ``model_name`` outside what the management API may start (see the module docstring)."""
    name = config.model_name
    if config.backend == "echo" or name == "echo" or name.startswith("echo:") or name.lower() in BUNDLED_ALIASES:
        return
    _check_source(name, limits, "model_name", _refused(name))


def check_loras(config: ReaderConfig, limits: ReaderLimits) -> None:
    """Refuse LoRA adapters (``loras``) outside what the management API may load: as for ``model_name``, a
    directory under ``repository_path`` or a Hugging Face id (``org/name``) that ``allowed_models`` lists."""
    for name, source in lora_entries(config.loras):
        check_lora(name, source, limits, "POST /reader", "loras")


def check_lora(name: str, source: str, limits: ReaderLimits, route: str, param: str) -> None:
    """Refuse one adapter ``source`` that ``route`` may not load (see :func:`check_loras`)."""
    refused = InvalidRequestError(
        f"LoRA {name!r} ({source[:256]!r}) is not an adapter {route} may load: name a directory under "
        "repository_path, or a Hugging Face id (org/name) that allowed_models lists",
        param=param,
    )
    _check_source(source, limits, param, refused, is_lora_hub_id)


def _is_model_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def _check_source(name: str, limits: ReaderLimits, param: str, refused: InvalidRequestError,
                  hub_id: Callable[[str], bool] = _is_model_hub_id) -> None:  # fmt: skip
    """Refuse (with ``refused``) a model or adapter ``name`` that is neither under ``repository_path`` nor an
    allowed Hugging Face id (``hub_id`` says what one looks like; already downloaded, unless ``allow_downloads``)."""
    root = limits.repository_path.expanduser().resolve()
    for candidate in (Path(name).expanduser(), root / name):  # the reader's order (backends.resolve)
        if _exists(candidate):
            if _inside(candidate, root):
                return
            raise refused
    if not hub_id(name):
        raise refused
    if not any(fnmatchcase(name, pattern) for pattern in limits.allowed_models):
        raise refused
    if not limits.allow_downloads and not _downloaded(name, root):
        raise InvalidRequestError(
            f"{name!r} is not in repository_path and allow_downloads is false: put its files at "
            f"{root / name}, or set allow_downloads",
            param=param,
        )


def _downloaded(model_id: str, root: Path) -> bool:
    """Whether the hub's cache under ``repository_path`` (``hub/models--ORG--NAME``) holds a snapshot of it."""
    snapshots = root / "hub" / f"models--{model_id.replace('/', '--')}" / "snapshots"
    try:
        return any(snapshots.iterdir())
    except OSError:
        return False
