"""``in_own_thread``: the model loads on a thread that has ended before the engine starts computing."""

from __future__ import annotations

import threading

import pytest

from liftoff.reader.process import in_own_thread


async def test_runs_on_a_new_thread_that_has_ended_when_it_returns() -> None:
    seen: list[threading.Thread] = []

    def load(value: int) -> int:
        seen.append(threading.current_thread())
        return value * 2

    assert await in_own_thread(load, 21) == 42
    [thread] = seen
    assert thread is not threading.main_thread()
    assert thread.name == "liftoff-load"
    assert not thread.is_alive()


async def test_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        await in_own_thread(fail)
