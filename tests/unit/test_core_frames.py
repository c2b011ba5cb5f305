"""``liftoff.core.frames``: every frame survives the msgpack codec, alone and in mixed batches."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from liftoff.core.frames import (
    PROTOCOL_VERSION,
    AbortFrame,
    DrainFrame,
    ErrorFrame,
    FinalFrame,
    HeartbeatFrame,
    LoadedFrame,
    LoadFailedFrame,
    RegisterFrame,
    RequestFrame,
    StopFrame,
    TokenFrame,
    WelcomeFrame,
    decode_gateway_frames,
    decode_reader_frames,
    encode_frames,
)
from liftoff.core.types import FinishReason, GenerationParams, ReaderInfo, RequestKind

INFO = ReaderInfo(
    consumer_groups=["primary", "extra"],
    consumer_name="r1@host:42",
    device="cpu",
    model_name="echo",
    model_type="CAUSAL",
    pids=[42, 43],
)

PARAMS = GenerationParams(
    max_new_tokens=7,
    min_new_tokens=2,
    temperature=0.25,
    top_k=40,
    top_p=0.9,
    repetition_penalty=1.5,
    no_repeat_ngram_size=3,
    prompt_max_tokens=64,
    regex_string=r"\d+",
    json_schema='{"type": "object"}',
    constrained_decoding_backend="outlines",
    lora_id="adapter-1",
    use_chat_template=True,
    return_metadata=True,
    seed=1234,
    ignore_eos=True,
    stop=("\n\n", "END"),
)

READER_FRAMES: list[Any] = [
    RegisterFrame(
        reader_id="r1",
        info=INFO,
        config={"model_name": "echo", "device": "cpu", "backend_options": {"token_delay_ms": 5}},
        heartbeat_interval_ms=250,
        loaded=True,
        capacity=8,
    ),
    LoadedFrame(model_type="CAUSAL", capacity=8, notes=["quant_type='awq' has no effect"]),
    LoadFailedFrame(reason="out of memory"),
    HeartbeatFrame(timestamp_ms=1_700_000_000_123, active=3, progress=0.5),
    DrainFrame(reason="SIGTERM"),
    TokenFrame(request_id="q-1", seq=4, text=" héllo\nworld 🙂", n_tokens=2),
    FinalFrame(request_id="q-1", seq=5, finish_reason="length", prompt_tokens=11, completion_tokens=5, reader_id="r1"),
    ErrorFrame(request_id="q-2", seq=0, error_type="context_length_exceeded", message="too long"),
]

GATEWAY_FRAMES: list[Any] = [
    WelcomeFrame(gateway_id="gw-1", reader_message_timeout_ms=500, heartbeat_interval_ms=1000),
    RequestFrame(request_id="q-1", consumer_group="primary", text="hello", deadline_ms=99, attempt=1),
    RequestFrame(request_id="q-2", consumer_group="extra", text="with params", params=PARAMS),
    AbortFrame(request_id="q-1"),
    StopFrame(reason="reader deleted"),
]


@pytest.mark.parametrize("frame", READER_FRAMES, ids=lambda frame: type(frame).__name__)
def test_reader_frame_round_trip(frame: Any) -> None:
    (decoded,) = decode_reader_frames(encode_frames([frame]))
    assert type(decoded) is type(frame)
    assert decoded == frame


@pytest.mark.parametrize("frame", GATEWAY_FRAMES, ids=lambda frame: type(frame).__name__)
def test_gateway_frame_round_trip(frame: Any) -> None:
    (decoded,) = decode_gateway_frames(encode_frames([frame]))
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_mixed_reader_batch_keeps_order_and_types() -> None:
    decoded = decode_reader_frames(encode_frames(READER_FRAMES))
    assert [type(frame) for frame in decoded] == [type(frame) for frame in READER_FRAMES]
    assert decoded == READER_FRAMES


def test_mixed_gateway_batch_keeps_order_and_types() -> None:
    batch = [*GATEWAY_FRAMES, *GATEWAY_FRAMES[::-1]]
    assert decode_gateway_frames(encode_frames(batch)) == batch


def test_request_frame_with_non_default_params() -> None:
    (decoded,) = decode_gateway_frames(encode_frames([GATEWAY_FRAMES[2]]))
    assert isinstance(decoded, RequestFrame)
    assert decoded.params == PARAMS
    assert decoded.params != GenerationParams()
    assert decoded.params.stop == ("\n\n", "END")
    assert decoded.params.temperature == 0.25
    assert decoded.params.seed == 1234
    assert decoded.kind is RequestKind.GENERATE


def test_request_frame_defaults_survive() -> None:
    frame = RequestFrame(request_id="q", consumer_group="primary")
    (decoded,) = decode_gateway_frames(encode_frames([frame]))
    assert isinstance(decoded, RequestFrame)
    assert decoded.text == ""
    assert decoded.params == GenerationParams()
    assert decoded.attempt == 0


def test_register_frame_defaults_protocol_version() -> None:
    frame = RegisterFrame(reader_id="r", info=INFO, config={}, heartbeat_interval_ms=1000)
    (decoded,) = decode_reader_frames(encode_frames([frame]))
    assert isinstance(decoded, RegisterFrame)
    assert decoded.protocol_version == PROTOCOL_VERSION
    assert decoded.loaded is False
    assert decoded.info.pids == [42, 43]


def test_finish_reason_enum_decodes_as_its_value() -> None:
    frame = FinalFrame(request_id="q", seq=0, finish_reason=FinishReason.ABORTED)
    (decoded,) = decode_reader_frames(encode_frames([frame]))
    assert isinstance(decoded, FinalFrame)
    assert decoded.finish_reason == "aborted"


def test_empty_batch() -> None:
    assert decode_reader_frames(encode_frames([])) == []
    assert decode_gateway_frames(encode_frames([])) == []


def test_reader_decoder_refuses_gateway_frames() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_reader_frames(encode_frames([AbortFrame(request_id="q")]))


def test_gateway_decoder_refuses_reader_frames() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_gateway_frames(encode_frames([TokenFrame(request_id="q", seq=0, text="x")]))


def test_garbage_is_refused() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_reader_frames(b"\xc1not msgpack")


def test_a_frame_that_cannot_be_encoded_costs_only_its_own_request() -> None:
    from liftoff.core.frames import ErrorFrame, FinalFrame, HeartbeatFrame, TokenFrame, encode_frames

    good = TokenFrame(request_id="a", seq=0, text="fine")
    bad = TokenFrame(request_id="b", seq=3, text="lone \ud800 surrogate")
    huge = FinalFrame(request_id="c", seq=1, finish_reason="stop", prompt_tokens=1 << 70)
    stats = HeartbeatFrame(timestamp_ms=1, stats={"x": 1.0}, active=1 << 70)  # no request: dropped
    frames = decode_reader_frames(encode_frames([good, bad, huge, stats, good]))
    assert frames[0] == good
    assert frames[-1] == good
    errors = [frame for frame in frames if isinstance(frame, ErrorFrame)]
    assert [(error.request_id, error.seq, error.error_type) for error in errors] == [
        ("b", 3, "internal_error"),
        ("c", 1, "internal_error"),
    ]
    assert "could not be encoded" in errors[0].message
    assert len(frames) == 4


def test_frames_encoded_ahead_travel_with_the_others() -> None:
    from liftoff.core.frames import TokenFrame, encode_frame, encode_frames

    first, second = TokenFrame(request_id="a", seq=0, text="x"), TokenFrame(request_id="a", seq=1, text="y")
    assert decode_reader_frames(encode_frames([encode_frame(first), second])) == [first, second]
