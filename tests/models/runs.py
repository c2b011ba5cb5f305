"""Collecting what a backend's steps produce, per request: shared by the backend tests of this package."""

from __future__ import annotations

from dataclasses import dataclass, field

from liftoff.backends.base import GenerativeBackend, StepOutput
from liftoff.core.types import FinishReason


@dataclass
class Run:
    """What one request produced."""

    pieces: list[str] = field(default_factory=list)
    final: StepOutput | None = None
    n_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def reason(self) -> FinishReason | None:
        return self.final.finish_reason if self.final else None


def step_into(backend: GenerativeBackend, runs: dict[str, Run]) -> None:
    """One step, its outputs added to ``runs``."""
    for out in backend.step():
        run = runs.setdefault(out.request_id, Run())
        assert run.final is None, f"{out.request_id} produced output after finishing"
        assert out.error is None
        run.pieces.append(out.text)
        run.n_tokens += out.n_tokens
        if out.finish_reason is not None:
            run.final = out


def drain(backend: GenerativeBackend, runs: dict[str, Run], max_steps: int = 2000) -> dict[str, Run]:
    """Step until the backend is empty, collecting every output."""
    for _ in range(max_steps):
        if not backend.active():
            return runs
        step_into(backend, runs)
    raise AssertionError("the backend did not finish")
