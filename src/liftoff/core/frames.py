"""Broker frames: every message between a gateway and its readers, and their msgpack codec.

Frames are msgspec structs (never pydantic models), tagged so one decoder reads a mixed batch. A transport
message is always a list of frames, so a busy reader or gateway coalesces many frames into one send.
Delivery is at least once; output frames carry ``(request_id, seq)`` so a gateway can drop duplicates.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from liftoff.core.errors import LiftoffError
from liftoff.core.types import GenerationParams, ReaderInfo, RequestKind

PROTOCOL_VERSION = 1

logger = logging.getLogger(__name__)


class _Frame(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, kw_only=True, gc=False):
    """Base of all frames; the tag is the class name."""


# ---- gateway → reader -------------------------------------------------------------------------------------------


class RequestFrame(_Frame, tag="req"):
    """One unit of work for a reader: a single prompt (a user batch is split into several)."""

    request_id: str
    consumer_group: str
    text: str = ""
    kind: RequestKind = RequestKind.GENERATE
    params: GenerationParams = msgspec.field(default_factory=GenerationParams)
    deadline_ms: int = 0
    attempt: int = 0
    reader_id: str = ""
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class AbortFrame(_Frame, tag="abort"):
    """Stop working on a request and free its slot."""

    request_id: str


class WelcomeFrame(_Frame, tag="welcome"):
    """The gateway's answer to a registration: settings the reader must follow."""

    gateway_id: str
    reader_message_timeout_ms: int
    heartbeat_interval_ms: int


class StopFrame(_Frame, tag="stop"):
    """Ask a reader process to exit (its reader was deleted, or the gateway is shutting down)."""

    reason: str


# ---- reader → gateway -------------------------------------------------------------------------------------------


class RegisterFrame(_Frame, tag="register"):
    """First frame on a new reader connection."""

    reader_id: str
    info: ReaderInfo
    config: dict[str, Any]
    heartbeat_interval_ms: int
    protocol_version: int = PROTOCOL_VERSION
    loaded: bool = False
    capacity: int = 0


class LoadedFrame(_Frame, tag="loaded"):
    """The model is loaded: the reader is live and can take ``capacity`` concurrent requests."""

    model_type: str
    capacity: int
    notes: list[str] = msgspec.field(default_factory=list)


class LoadFailedFrame(_Frame, tag="load_failed"):
    """The model could not be loaded; the reader will exit."""

    reason: str


class HeartbeatFrame(_Frame, tag="hb"):
    """Periodic liveness signal; also sent as a keep-alive while requests are in flight.

    ``quiet_ms`` announces a long task that may hold the whole reader process (Python's GIL) for up to that long,
    such as the first import of a large library: the gateway then does not take that silence for death (it caps
    the grace at :data:`MAX_QUIET_MS`).
    """

    timestamp_ms: int
    active: int = 0
    progress: float = -1.0
    stats: dict[str, float] = msgspec.field(default_factory=dict)  # the reader's running totals, for /metrics
    quiet_ms: int = 0
    unhealthy: str = ""  # why the reader cannot serve now (an API reader's upstream is down); "" when it can
    loras: str | None = None  # its LoRA adapters now, comma-separated ("": none; None: not told), as they change


MAX_QUIET_MS = 60_000  # the longest silence a reader may announce


class ClaimedFrame(_Frame, tag="claimed"):
    """A reader took a request from a shared queue (Redis broker): the gateway now knows who runs it.

    ``entry`` is the request's queue entry id; ``reclaimed`` says the reader took it over from a dead reader.
    """

    request_id: str
    reader_id: str
    entry: str = ""
    reclaimed: bool = False


class DrainFrame(_Frame, tag="drain"):
    """The reader is shutting down: it finishes what it has and takes nothing new."""

    reason: str


class TokenFrame(_Frame, tag="tok"):
    """A piece of generated text for one request (may stand for several tokens).

    With ``GenerationParams.running_counts`` it also carries the prompt's token count and the tokens generated so
    far (0 otherwise).
    """

    request_id: str
    seq: int
    text: str
    n_tokens: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FinalFrame(_Frame, tag="fin"):
    """The request ended normally (or was aborted); the last frame of a request."""

    request_id: str
    seq: int
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reader_id: str = ""


class ResultFrame(_Frame, tag="res"):
    """The whole answer of a non-streaming request (tokenize, detokenize, chat template); its last frame."""

    request_id: str
    seq: int
    data: dict[str, Any]


class ErrorFrame(_Frame, tag="err"):
    """The request failed; the last frame of a request."""

    request_id: str
    seq: int
    error_type: str
    message: str


def error_frame(request_id: str, error: LiftoffError, seq: int = 0) -> ErrorFrame:
    """The frame that ends a request with ``error``."""
    return ErrorFrame(request_id=request_id, seq=seq, error_type=error.error_type, message=error.message)


OutputFrame = TokenFrame | FinalFrame | ResultFrame | ErrorFrame
ReaderFrame = (
    RegisterFrame
    | LoadedFrame
    | LoadFailedFrame
    | HeartbeatFrame
    | DrainFrame
    | ClaimedFrame
    | TokenFrame
    | FinalFrame
    | ResultFrame
    | ErrorFrame
)
GatewayFrame = WelcomeFrame | RequestFrame | AbortFrame | StopFrame

_encoder = msgspec.msgpack.Encoder()
_reader_decoder = msgspec.msgpack.Decoder(list[ReaderFrame])
_gateway_decoder = msgspec.msgpack.Decoder(list[GatewayFrame])

# What msgspec raises for a value msgpack cannot hold: an integer beyond 64 bits, a string with lone surrogates.
ENCODE_ERRORS = (OverflowError, ValueError, TypeError, msgspec.EncodeError)


def encode_frames(frames: list[Any]) -> bytes:
    """Encode a batch of frames (or frames already encoded, as :class:`msgspec.Raw`) as one transport message.

    One frame that cannot be encoded never costs the others: the batch is then encoded frame by frame, an output
    frame that fails becomes the error frame of its request, and any other is dropped (and logged).
    """
    try:
        return _encoder.encode(frames)
    except ENCODE_ERRORS:
        return _encoder.encode([raw for frame in frames if (raw := _encode_alone(frame)) is not None])


def encode_frame(frame: Any) -> msgspec.Raw:
    """One frame encoded now (raises one of :data:`ENCODE_ERRORS`), to be sent later by :func:`encode_frames`."""
    return msgspec.Raw(_encoder.encode(frame))


def _encode_alone(frame: Any) -> msgspec.Raw | None:
    try:
        return encode_frame(frame)
    except ENCODE_ERRORS as exc:
        logger.error("a %s frame could not be encoded: %s", type(frame).__name__, exc)
        if not isinstance(frame, TokenFrame | FinalFrame | ResultFrame | ErrorFrame):
            return None
        error = LiftoffError(f"the answer could not be encoded ({type(exc).__name__}: {exc})")
        return encode_frame(error_frame(frame.request_id, error, frame.seq))


def decode_reader_frames(data: bytes) -> list[ReaderFrame]:
    """Decode a message sent by a reader."""
    return _reader_decoder.decode(data)


def decode_gateway_frames(data: bytes) -> list[GatewayFrame]:
    """Decode a message sent by a gateway."""
    return _gateway_decoder.decode(data)
