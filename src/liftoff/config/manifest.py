"""Reading and writing the ``config.yaml`` manifest.

Readers created or deleted through the management API are written back so runtime changes survive a restart,
as Takeoff does (``add_to_manifest_yaml``). Writes keep the rest of the file (comments included) and are atomic.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_lock = threading.Lock()


class ManifestError(Exception):
    """The manifest is unreadable or lacks the ``takeoff:`` key."""


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    return yaml


def read_manifest(path: Path) -> dict[str, Any]:
    """The ``takeoff:`` section of a manifest, as plain data."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = YAML(typ="safe").load(text)
    except Exception as exc:  # ruamel raises many parser error types
        raise ManifestError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "takeoff" not in data:
        raise ManifestError(f"No takeoff key found in manifest {path}: the file must start with 'takeoff:'")
    section = data["takeoff"] or {}
    if not isinstance(section, dict):
        raise ManifestError(f"'takeoff' in {path} must be a mapping with server_config and readers_config")
    return section


def _write(target: Path, yaml: YAML, doc: Any) -> None:
    """Replace ``target`` atomically, keeping its permissions; write in place where a rename is impossible
    (a file bind-mounted on its own, as Docker does)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.dump(doc, handle)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM):
            raise
        with target.open("w", encoding="utf-8") as handle:
            yaml.dump(doc, handle)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rewrite(path: Path, change: Callable[[Any], bool]) -> None:
    """Apply ``change`` to ``readers_config``; rewrite the file only if it reports a change."""
    with _lock:
        target = path.resolve()
        yaml = _yaml()
        doc = yaml.load(target.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ManifestError(f"{path} is not a mapping with a 'takeoff:' key")
        takeoff = doc.get("takeoff")
        if takeoff is None:
            doc["takeoff"] = takeoff = {}
        readers = takeoff.get("readers_config")
        if readers is None:
            takeoff["readers_config"] = readers = {}
        if change(readers):
            _write(target, yaml, doc)


def add_reader(path: Path, reader_id: str, config: dict[str, Any]) -> None:
    """Write reader ``reader_id`` into ``readers_config``."""

    def change(readers: Any) -> bool:
        readers[reader_id] = config
        return True

    _rewrite(path, change)


def remove_reader(path: Path, reader_id: str) -> None:
    """Remove reader ``reader_id`` from ``readers_config`` (the file is untouched if it is not there)."""

    def change(readers: Any) -> bool:
        return readers.pop(reader_id, None) is not None

    _rewrite(path, change)
