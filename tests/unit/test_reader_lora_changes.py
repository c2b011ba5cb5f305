"""Adapter changes on the engine (``liftoff.reader.lora_changes``): the slow reading runs off the engine thread, so
running streams keep flowing; the install happens between steps and answers with the adapters; a change past its
deadline, or abandoned, installs nothing; a backend without adapters says so.

The backend is echo, which holds no adapters (its refusals are tested as they are), and a subclass of it that
keeps a list of names and takes a set time to read one: what is under test is the engine's handling of the
change, the transformers backend's own adapters are tested in tests/models/test_lora.py and
tests/unit/test_backends_lora_set.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from liftoff.backends.echo import EchoBackend
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotFoundError
from liftoff.core.frames import ErrorFrame, RequestFrame, ResultFrame, TokenFrame
from liftoff.core.types import GenerationParams, RequestKind
from liftoff.reader.engine import Engine
from tests.unit.test_reader_engine import Frames

FOREVER = GenerationParams(ignore_eos=True, max_new_tokens=10**9)


class SlowAdapters(EchoBackend):
    """Echo with adapter names: reading one takes ``read_s`` seconds on the caller's thread."""

    def __init__(self, read_s: float) -> None:
        super().__init__(ReaderConfig(model_name="echo", device="cpu", backend_options={"token_delay_ms": 5}))
        self.read_s = read_s
        self.names: list[str] = []
        self.read_on: list[str] = []  # the threads adapters were read on
        self.installed_on: list[str] = []

    def load_lora(self, name: str, source: str) -> object:
        self.read_on.append(threading.current_thread().name)
        time.sleep(self.read_s)
        if source == "broken":
            raise InvalidRequestError(f"LoRA {name!r}: no adapter directory at {source}")
        return name

    def install_lora(self, loaded: object) -> None:
        self.installed_on.append(threading.current_thread().name)
        if loaded in self.names:
            raise InvalidRequestError(f"LoRA {loaded!r} is already an adapter of this reader")
        self.names = [*self.names, str(loaded)]

    def remove_lora(self, name: str) -> None:
        if name not in self.names:
            raise NotFoundError(f"LoRA {name!r} is not an adapter of this reader; it has: {', '.join(self.names)}")
        self.names = [other for other in self.names if other != name]

    def lora_names(self) -> list[str]:
        return list(self.names)


def change(request_id: str, kind: RequestKind, **payload: Any) -> RequestFrame:
    return RequestFrame(request_id=request_id, consumer_group="", kind=kind, reader_id="r", payload=payload)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.stop()


def start(engines: list[Engine], backend: EchoBackend) -> tuple[Engine, Frames]:
    frames = Frames()
    engine = Engine(backend, frames.emit, reader_id="r")
    engines.append(engine)
    engine.start()
    return engine, frames


def answer(frames: Frames, request_id: str, timeout: float = 5.0) -> Any:
    frames.wait(lambda items: any(isinstance(f, ResultFrame | ErrorFrame) and f.request_id == request_id
                                  for f in items), timeout)  # fmt: skip
    return next(f for f in frames.of(request_id) if isinstance(f, ResultFrame | ErrorFrame))


def test_streams_keep_flowing_while_an_adapter_is_read(engines: list[Engine]) -> None:
    backend = SlowAdapters(read_s=0.5)
    engine, frames = start(engines, backend)
    engine.submit(RequestFrame(request_id="s", consumer_group="primary", text="tick " * 10_000, params=FOREVER))
    frames.wait(lambda items: any(isinstance(f, TokenFrame) for f in items))
    engine.submit(change("add", RequestKind.ADD_LORA, name="alpha", source="/adapters/alpha", timeout_s=10))
    time.sleep(0.05)
    assert engine.in_flight == 2  # the stream and the change: the reader keeps sending keep-alives
    before = len(frames.tokens("s"))
    result = answer(frames, "add")
    during = len(frames.tokens("s")) - before
    assert isinstance(result, ResultFrame)
    assert result.data == {"loras": ["alpha"]}
    assert during >= 20, during  # 5 ms a token for 0.5 s: the engine stepped all along
    assert backend.read_on == ["liftoff-lora-load"]
    assert backend.installed_on == ["liftoff-engine"]  # installed between steps, on the engine thread
    engine.submit(change("dup", RequestKind.ADD_LORA, name="alpha", source="/x", timeout_s=10))
    duplicate = answer(frames, "dup")
    assert isinstance(duplicate, ErrorFrame)
    assert "already an adapter" in duplicate.message
    engine.submit(change("rm", RequestKind.REMOVE_LORA, name="alpha"))
    assert answer(frames, "rm").data == {"loras": []}
    engine.submit(change("rm2", RequestKind.REMOVE_LORA, name="alpha"))
    gone = answer(frames, "rm2")
    assert isinstance(gone, ErrorFrame)
    assert gone.error_type == "not_found"
    assert not [f for f in frames.of("s") if isinstance(f, ErrorFrame)]  # the stream went on untouched
    engine.abort("s")


def test_a_change_past_its_deadline_installs_nothing(engines: list[Engine]) -> None:
    backend = SlowAdapters(read_s=0.6)
    engine, frames = start(engines, backend)
    engine.submit(change("late", RequestKind.ADD_LORA, name="alpha", source="/a", timeout_s=0.1))
    late = answer(frames, "late")
    assert isinstance(late, ErrorFrame)
    assert late.error_type == "invalid_request"
    assert "'alpha' took longer than 0.1 s to load" in late.message
    assert "lora_load_timeout_s" in late.message
    engine.submit(change("gone", RequestKind.ADD_LORA, name="beta", source="/b", timeout_s=10))
    time.sleep(0.05)
    engine.abort("gone")  # the gateway gave up on it (its client left)
    time.sleep(1.5)  # both readings have ended meanwhile
    assert backend.names == []
    assert backend.installed_on == []
    assert engine.in_flight == 0
    engine.submit(change("bad", RequestKind.ADD_LORA, name="gamma", source="broken", timeout_s=10))
    bad = answer(frames, "bad")
    assert isinstance(bad, ErrorFrame)
    assert "no adapter directory at broken" in bad.message


def test_a_backend_without_adapters_says_so(engines: list[Engine]) -> None:
    engine, frames = start(engines, EchoBackend(ReaderConfig(model_name="echo", device="cpu")))
    engine.submit(change("add", RequestKind.ADD_LORA, name="alpha", source="/a", timeout_s=5))
    refused = answer(frames, "add")
    assert isinstance(refused, ErrorFrame)
    assert refused.error_type == "not_supported"
    assert "the echo backend holds no LoRA adapters" in refused.message
    engine.submit(change("rm", RequestKind.REMOVE_LORA, name="alpha"))
    missing = answer(frames, "rm")
    assert isinstance(missing, ErrorFrame)
    assert missing.error_type == "not_found"
