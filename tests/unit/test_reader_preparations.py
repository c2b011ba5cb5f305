"""The engine's preparations (``GenerativeBackend.preparation``, e.g. compiling a grammar): run beside the batch,
admitted when done, failed alone on an error or past their budget, skipped when cancelled; and a crashed engine
says so."""

from __future__ import annotations

import threading
from typing import Any

import msgspec

from liftoff.backends.base import Preparation
from liftoff.backends.echo import EchoBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.core.frames import ErrorFrame, FinalFrame, HeartbeatFrame
from liftoff.core.types import GenerationParams
from liftoff.reader.engine import Engine
from tests.unit.test_reader_engine import FOREVER, Frames, StartEngine, request, start_engine

__all__ = ["start_engine"]  # the fixture, imported for this module's tests


class _Preparing(EchoBackend):
    """Echo, with a preparation for prompts that say how (``wait``, ``fail``, ``refuse``, ``quiet``)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        super().__init__(ReaderConfig(model_name="echo", device="cpu", backend_options={"token_delay_ms": 1}))
        self.release = threading.Event()
        self.ran: list[str] = []
        self.timeout_s = timeout_s
        self.current = ""

    def preparation(self, params: GenerationParams) -> Preparation | None:
        how = params.regex_string
        if how is None:
            return None
        if how == "refuse":
            raise InvalidRequestError("refused before preparing", param="regex_string")
        return Preparation(lambda: self._run(how), self.timeout_s, "preparing it", 0.01 if how == "quiet" else 0.0)

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        super().admit(request_id, text, msgspec.structs.replace(params, regex_string=None))  # echo takes no grammar

    def _run(self, how: str) -> None:
        self.ran.append(how)
        if how == "wait":
            assert self.release.wait(10)
        if how == "fail":
            raise RuntimeError("the compiler broke")


def prepared(how: str, **fields: Any) -> GenerationParams:
    return GenerationParams(regex_string=how, **fields)


def test_a_request_is_admitted_when_its_preparation_is_done_and_others_flow_meanwhile(
    start_engine: StartEngine,
) -> None:
    backend = _Preparing()
    engine, frames = start_engine(backend=backend)
    engine.submit(request("neighbour", "la", FOREVER))
    engine.submit(request("slow", "x y", prepared("wait")))
    frames.wait(lambda items: len([f for f in items if getattr(f, "request_id", "") == "neighbour"]) > 20)
    assert frames.of("slow") == []  # still preparing, while the neighbour streams
    backend.release.set()
    assert frames.wait_final("slow").finish_reason == "stop"
    assert "".join(token.text for token in frames.tokens("slow")) == "x y"
    engine.abort("neighbour")


def test_a_failed_preparation_fails_its_request_alone(start_engine: StartEngine) -> None:
    engine, frames = start_engine(backend=_Preparing())
    engine.submit(request("broken", "x", prepared("fail")))
    engine.submit(request("refused", "x", prepared("refuse")))
    engine.submit(request("plain", "fine"))
    broken, refused = frames.wait_final("broken"), frames.wait_final("refused")
    assert isinstance(broken, ErrorFrame)
    assert broken.error_type == "generation_error"
    assert "preparing it failed: RuntimeError: the compiler broke" in broken.message
    assert isinstance(refused, ErrorFrame)
    assert refused.error_type == "invalid_request"
    assert frames.wait_final("plain").finish_reason == "stop"


def test_a_preparation_past_its_budget_is_a_400(start_engine: StartEngine) -> None:
    backend = _Preparing(timeout_s=0.05)
    engine, frames = start_engine(backend=backend)
    engine.submit(request("late", "x", prepared("wait")))
    late = frames.wait_final("late")
    assert isinstance(late, ErrorFrame)
    assert late.error_type == "invalid_request"
    assert "took longer than 0.05 s preparing it" in late.message
    backend.release.set()
    engine.submit(request("next", "y", prepared("quick")))  # the thread is free again; the late one stays failed
    assert frames.wait_final("next").finish_reason == "stop"
    assert len([f for f in frames.of("late") if isinstance(f, FinalFrame | ErrorFrame)]) == 1


def test_a_request_cancelled_while_it_waits_its_turn_is_never_prepared(start_engine: StartEngine) -> None:
    backend = _Preparing()
    engine, frames = start_engine(backend=backend)
    engine.submit(request("first", "x", prepared("wait")))
    engine.submit(request("second", "x", prepared("skip-me")))
    engine.abort("second")
    assert frames.wait_final("second").finish_reason == "aborted"
    backend.release.set()
    assert frames.wait_final("first").finish_reason == "stop"
    assert backend.ran == ["wait"]


def test_a_preparation_that_may_hold_the_process_is_announced_first(start_engine: StartEngine) -> None:
    engine, frames = start_engine(backend=_Preparing())
    engine.submit(request("q", "x", prepared("quiet")))
    frames.wait_final("q")
    first = frames.all()[0]
    assert isinstance(first, HeartbeatFrame)
    assert first.quiet_ms == 10


def test_a_crashed_engine_thread_tells_its_owner() -> None:
    crashed: list[BaseException] = []
    done = threading.Event()

    class _Broken(Engine):
        def _run(self) -> None:
            raise RuntimeError("a bug")

    engine = _Broken(EchoBackend(ReaderConfig(model_name="echo", device="cpu")), Frames().emit)
    engine.on_crash = lambda exc: (crashed.append(exc), done.set())
    engine.start()
    assert done.wait(5)
    assert str(crashed[0]) == "a bug"
