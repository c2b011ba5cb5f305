"""Progress lines: on stderr, so that a bench's report on stdout can be piped or redirected on its own."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Progress goes to stderr; the report goes to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
