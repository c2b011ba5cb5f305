"""Reading and writing the ``config.yaml`` manifest.

Readers created or deleted through the management API are written back so runtime changes survive a restart,
as Takeoff does (``add_to_manifest_yaml``). Writes keep the rest of the file (comments included) and can neither
corrupt it nor lose another process's change:

- the whole read-change-write runs under a lock file next to the manifest (``.config.yaml.lock``, an ``flock``),
  shared by every process that writes it, such as two gateways on one host or on one shared volume;
- the new text goes to a temporary file in the same directory, which is flushed to disk (``fsync``), given the
  manifest's permissions and renamed over it; then the directory is synced, so the rename survives a power cut;
- every failure raises :class:`ManifestError` and leaves the manifest as it was. A manifest that cannot be
  replaced by a rename (a file bind-mounted on its own, as ``docker -v config.yaml:...`` does) is an error that
  says to mount its directory instead: it is never rewritten in place, which a crash could leave half-written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_lock = threading.Lock()  # flock is per open file, so threads of one process also take this


class ManifestError(Exception):
    """The manifest is unreadable, lacks the ``takeoff:`` key, or could not be written."""


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


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the manifest's lock file (``.NAME.lock`` beside it) and this process's lock."""
    lock_path = target.with_name(f".{target.name}.lock")
    with _lock:
        try:
            handle = open(lock_path, "a")  # noqa: SIM115 (held across the yield)
        except OSError as exc:
            raise ManifestError(f"cannot create the lock file {lock_path}: {exc.strerror}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(target: Path, text: str) -> None:
    """Replace ``target`` with ``text``: temporary file, fsync, same permissions, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        bind_mounted = exc.errno in (errno.EBUSY, errno.EXDEV)
        hint = " (mount the directory that holds it, not the file alone)" if bind_mounted else ""
        raise ManifestError(f"cannot replace {target}: {exc.strerror}{hint}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _fsync_dir(target.parent)
    except OSError as exc:
        raise ManifestError(f"{target} was replaced but its directory could not be synced: {exc.strerror}") from exc


def _load(target: Path, yaml: YAML) -> Any:
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read config file {target}: {exc.strerror}") from exc
    try:
        doc = yaml.load(text)
    except Exception as exc:  # ruamel raises many parser error types
        raise ManifestError(f"config file {target} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{target} is not a mapping with a 'takeoff:' key")
    return doc


def _dump(yaml: YAML, doc: Any, target: Path) -> str:
    stream = io.StringIO()
    try:
        yaml.dump(doc, stream)
    except Exception as exc:  # a value YAML cannot represent
        raise ManifestError(f"the change cannot be written as YAML into {target}: {exc}") from exc
    return stream.getvalue()


def _rewrite(path: Path, change: Callable[[Any], bool]) -> None:
    """Apply ``change`` to ``readers_config`` under the lock; rewrite the file only if it reports a change."""
    target = path.resolve()
    with locked(target):
        yaml = _yaml()
        doc = _load(target, yaml)
        takeoff = doc.get("takeoff")
        if takeoff is None:
            doc["takeoff"] = takeoff = {}
        if not isinstance(takeoff, dict):
            raise ManifestError(f"'takeoff' in {target} must be a mapping with server_config and readers_config")
        readers = takeoff.get("readers_config")
        if readers is None:
            takeoff["readers_config"] = readers = {}
        if not isinstance(readers, dict):
            raise ManifestError(f"readers_config in {target} must be a mapping of readers")
        if change(readers):
            _write(target, _dump(yaml, doc, target))


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


def set_reader_loras(path: Path, reader_id: str, loras: list[str]) -> None:
    """Write reader ``reader_id``'s ``loras`` (``name=source`` entries; none: the key goes) after an adapter was
    added to it or removed at runtime. A reader the manifest does not hold (a headless one) is left alone."""

    def change(readers: Any) -> bool:
        entry = readers.get(reader_id)
        if not isinstance(entry, dict):
            return False
        if loras:
            entry["loras"] = list(loras)
        else:
            entry.pop("loras", None)
        return True

    _rewrite(path, change)
