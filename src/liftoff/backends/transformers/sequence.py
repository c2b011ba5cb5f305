"""One sequence of the transformers backend, and what each new token does to it: text, end of sequence, limits.

Kept apart from :mod:`liftoff.backends.transformers.backend` (which schedules the forwards and the KV cache rows) so
that a token's accounting reads in one place: an end-of-sequence token ends the sequence (``stop``), otherwise
the token's text is streamed and the sequence ends when its grammar is complete (``stop``) or its budget spent
(``length``).
"""

from __future__ import annotations

from dataclasses import dataclass

from liftoff.backends.base import StepOutput
from liftoff.backends.sampling import FAILED, SamplerState, finish_reason, sequence_failure
from liftoff.backends.transformers.detok import Detokenizer, TextStream
from liftoff.core.errors import BackendError
from liftoff.core.types import FinishReason


@dataclass(slots=True, eq=False)
class HFSequence:
    """A request being served: its prompt, sampler, output budget and decoding state."""

    request_id: str
    prompt: list[int]
    sampler: SamplerState
    budget: int
    stream: TextStream
    length: int = 0  # positions held in the cache
    last: int = 0  # the token the next decode feeds
    unreported: int = 0  # tokens not yet counted in a StepOutput
    done: bool = False
    adapter: int = 0  # LoRA slot (liftoff.backends.transformers.lora; 0: the base model)


def account(seq: HFSequence, token: int, detok: Detokenizer, eos: frozenset[int], out: list[StepOutput]) -> None:
    """Take ``seq``'s new ``token`` (already in its sampler): add what it produced, or how it ended, to ``out``.

    A token that could not be chosen (:data:`FAILED`) or text that cannot be decoded ends this sequence alone, with
    an error: the others of the batch go on.
    """
    if token == FAILED:
        fail(seq, out, sequence_failure(seq.sampler))
        return
    try:
        _account(seq, token, detok, eos, out)
    except Exception as exc:
        fail(seq, out, BackendError(f"decoding the output failed ({type(exc).__name__}: {exc}); this request ended"))


def fail(seq: HFSequence, out: list[StepOutput], error: BackendError) -> None:
    """End ``seq`` with ``error``."""
    seq.done = True
    out.append(StepOutput(seq.request_id, error=error))


def _account(seq: HFSequence, token: int, detok: Detokenizer, eos: frozenset[int], out: list[StepOutput]) -> None:
    seq.last = token
    seq.unreported += 1
    if token in eos:
        out.append(finish(seq, FinishReason.STOP, detok.next(seq.stream, final=True)))
        return
    seq.stream.ids.append(token)
    reason = finish_reason(seq.sampler, seq.budget)
    if reason is not None:
        out.append(finish(seq, reason, detok.next(seq.stream, final=True)))
        return
    text = detok.next(seq.stream)
    if text:
        out.append(StepOutput(seq.request_id, text, seq.unreported))
        seq.unreported = 0


def finish(seq: HFSequence, reason: FinishReason, text: str) -> StepOutput:
    """Mark ``seq`` done; its last output, with the token counts."""
    seq.done = True
    return StepOutput(
        seq.request_id,
        text,
        seq.unreported,
        finish_reason=reason,
        prompt_tokens=len(seq.prompt),
        completion_tokens=len(seq.sampler.generated),
    )
