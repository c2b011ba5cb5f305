"""One JSON request with the standard library: health checks and management calls of the servers a bench starts,
which must work before (and whatever) the load generator or an HTTP client library is set up."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def get_json(url: str, data: bytes | None = None) -> tuple[int, Any]:
    """``(status, decoded body)`` of a GET (a POST when ``data`` is given); an HTTP error status is an answer, not
    an exception (a connection error still raises ``OSError``, which ``procs.wait_for`` treats as not ready)."""
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
