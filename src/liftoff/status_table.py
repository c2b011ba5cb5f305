"""``liftoff status``: the readers of a running gateway as a table on the terminal (the web UI's Readers page).

It reads the management ``GET /status`` (and, for loading readers, ``GET /reader/{id}`` for their progress) with
the standard library only, so it works from any machine that reaches the management port. A gateway with
``management_api_keys`` is sent one: the first of ``TAKEOFF_MANAGEMENT_API_KEYS`` or of the file
``TAKEOFF_MANAGEMENT_API_KEYS_FILE`` names (the gateway's own variables, so the same environment serves both).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = ("READER", "STATE", "GROUPS", "MODEL", "TYPE", "DEVICE", "PIDS", "HEARTBEAT")


class StatusError(Exception):
    """The gateway could not be asked (not running, wrong address, an error answer)."""


def management_key(env: Mapping[str, str]) -> str | None:
    """The key to send: the first of ``TAKEOFF_MANAGEMENT_API_KEYS``, else of the file its ``_FILE`` names."""
    keys = [key.strip() for key in env.get("TAKEOFF_MANAGEMENT_API_KEYS", "").split(",") if key.strip()]
    path = env.get("TAKEOFF_MANAGEMENT_API_KEYS_FILE")
    if not keys and path:
        try:
            keys = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise StatusError(f"cannot read TAKEOFF_MANAGEMENT_API_KEYS_FILE {path}: {exc.strerror}") from None
    return keys[0] if keys else None


def fetch(url: str, timeout: float = 5.0, key: str | None = None) -> Any:
    """The JSON answer of ``GET url`` (sent with ``key`` as a bearer token, if any)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url} answered {exc.code}: {exc.read().decode(errors='replace')[:200]}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {url}: {reason} (is `liftoff serve` running there?)") from None


def _age(heartbeats: dict[str, Any], reader_id: str, now_ms: int) -> str:
    beat = heartbeats.get(reader_id, {}).get("heartbeat_timestamp")
    return f"{max(0.0, (now_ms - int(beat)) / 1000):.1f}s ago" if beat else "-"


def rows(status: dict[str, Any], progress: dict[str, float], now_ms: int) -> list[tuple[str, ...]]:
    """One row per reader, live first, then loading, then dead; by consumer group within each."""
    body = status["status"]
    heartbeats = body.get("last_heartbeat", {})
    out: list[tuple[str, ...]] = []
    for state in ("live", "loading", "dead"):
        readers = body.get(f"{state}_readers", {})
        for reader_id, info in sorted(readers.items(), key=lambda item: (item[1]["consumer_groups"], item[0])):
            label = f"loading {progress[reader_id]:.0%}" if reader_id in progress else state
            pids = ",".join(map(str, info["pids"])) or "-"
            groups = ",".join(info["consumer_groups"])
            out.append((reader_id, label, groups, info["model_name"], info["model_type"], info["device"], pids,
                        _age(heartbeats, reader_id, now_ms)))  # fmt: skip
    return out


def render(table: list[tuple[str, ...]]) -> str:
    """Aligned columns with a header."""
    if not table:
        return "no readers (add one with POST /reader on the management port, or the web UI's Readers page)"
    widths = [max(len(column), *(len(row[i]) for row in table)) for i, column in enumerate(COLUMNS)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
             for row in [COLUMNS, *table]]  # fmt: skip
    return "\n".join(lines)


def status_text(base: str, env: Mapping[str, str] | None = None) -> str:
    """The readers table of the gateway whose management API is at ``base`` (``http://host:3001``)."""
    base = base.rstrip("/")
    key = management_key(os.environ if env is None else env)
    status = fetch(f"{base}/status", key=key)
    progress: dict[str, float] = {}
    for reader_id in status["status"].get("loading_readers", {}):
        try:
            progress[reader_id] = float(fetch(f"{base}/reader/{reader_id}", key=key)["loading_progress"])
        except (StatusError, KeyError, TypeError, ValueError):
            continue
    return render(rows(status, progress, int(time.time() * 1000)))
