"""Process-wide runtime settings shared by the gateway and reader processes."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Once start-up is done: move everything alive out of the collector's sight and collect less often.

    The request path allocates many short-lived objects and makes few reference cycles; with the default
    thresholds a quarter of the gateway's CPU went to scanning long-lived objects again and again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
