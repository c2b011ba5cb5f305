"""A reader's LoRA adapters as configured: the ``loras`` field's entries, their names, and the hub-id rule.

Kept apart from :mod:`liftoff.config.models` (which re-exports these names): the field holds the comma-separated
string Takeoff shows, and every part of Liftoff that reads or changes it (the reader's backends, the management
API's checks and runtime changes, the manifest) goes through these functions, so they agree on what an entry is.
"""

from __future__ import annotations

import re

MAX_LORAS = 64  # max_loras, and adapters on one reader
DEFAULT_MAX_LORAS = 8
# What a reader's loras may be given as (the field holds the comma-separated string Takeoff shows).
LORAS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A LoRA adapter on the Hugging Face hub: always ``org/name`` (one definition, for the reader that loads it and for
# the management API's check of what it may load, so that what passes the check is what the reader can find).
_LORA_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def lora_entries(loras: str | None) -> list[tuple[str, str]]:
    """A reader's ``loras`` as (name, source) pairs, in order: ``name=source``, or a source whose last path
    component is the name (a ``.gguf`` file: without the extension). Raises ValueError (saying what to write
    instead) for a bad or repeated name."""
    pairs: list[tuple[str, str]] = []
    for entry in (loras or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, source = entry.partition("=")
        if not sep:  # the last path component, without the extension of a GGUF adapter file
            name, source = entry.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf"), entry
        name, source = name.strip(), source.strip()
        if not source:
            raise ValueError(f"LoRA entry {entry!r} has no path: write 'name=path' or a path")
        if not _LORA_NAME.match(name):
            raise ValueError(
                f"LoRA name {name!r} (from {entry!r}) is not a valid adapter name: use letters, digits, '.', '_' "
                "and '-' (at most 128), starting with a letter or digit; write 'name=path' to choose it"
            )
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"LoRA name {name!r} appears twice in loras; give one of them another with 'name=path'")
        pairs.append((name, source))
    if len(pairs) > MAX_LORAS:
        raise ValueError(f"loras lists {len(pairs)} adapters; a reader holds at most {MAX_LORAS}")
    return pairs


def is_lora_hub_id(source: str) -> bool:
    """Whether an adapter ``source`` that is no local directory may name a Hugging Face repository: ``org/name``."""
    return bool(_LORA_HUB_ID.match(source)) and ".." not in source


def lora_entry(name: str, source: str) -> tuple[str, str]:
    """One adapter added at runtime, checked as an entry of ``loras`` would be (ValueError: what is wrong); a
    source with a comma cannot be written into ``loras`` and is refused."""
    if "," in source:
        raise ValueError(f"LoRA {name[:128]!r}: its path {source[:256]!r} has a comma, which loras cannot hold")
    if "=" in name or not _LORA_NAME.match(name):
        raise ValueError(
            f"LoRA name {name[:128]!r} is not a valid adapter name: use letters, digits, '.', '_' and '-' (at "
            "most 128), starting with a letter or digit"
        )
    if not source.strip():
        raise ValueError(f"LoRA {name!r} has no path")
    return name, source.strip()


def join_loras(entries: list[tuple[str, str]]) -> str | None:
    """``loras`` as the field holds it (``name=source,...``), or None without adapters."""
    return ",".join(f"{name}={source}" for name, source in entries) or None


def lora_names(loras: str | None) -> str | None:
    """The adapter names of ``loras``, comma-separated as ``ReaderInfo.loras`` shows them; None without any."""
    return ",".join(name for name, _ in lora_entries(loras)) or None
