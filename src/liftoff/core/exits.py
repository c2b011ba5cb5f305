"""Exit codes of a reader process, and their meaning to the gateway that supervises it.

The supervisor decides from a reader's exit whether to restart it (``restart_policy``): a model that failed to
load is a permanent error; a reader that lost its gateway without being asked to stop has failed; 0 is a clean
stop (on SIGTERM or the gateway's stop frame).
"""

from __future__ import annotations

import signal

EXIT_CLEAN = 0
EXIT_LOAD_FAILED = 3  # the model failed to load (a wrong path, a bad file): restarting would fail the same way
EXIT_GATEWAY_LOST = 4  # a supervised reader's link to its gateway closed although nobody asked it to stop


def describe_exit(code: int) -> str:
    """``exited with code 4 (it lost its gateway)``, ``was killed by SIGKILL``: one exit, in words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    meaning = {
        EXIT_CLEAN: "a clean stop",
        EXIT_LOAD_FAILED: "its model failed to load",
        EXIT_GATEWAY_LOST: "it lost its gateway",
    }.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")
