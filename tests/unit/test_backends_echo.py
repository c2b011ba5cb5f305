"""``liftoff.backends.echo`` (and the ``GenerativeBackend`` base): tokenization, finish reasons, limits and notes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from liftoff.backends.base import BackendContext, GenerativeBackend, ProgressCallback, StepOutput
from liftoff.backends.echo import CRASH_EXIT_CODE, EchoBackend, tokenize
from liftoff.backends.resolve import ResolvedModel
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError, NotSupportedError
from liftoff.core.types import FinishReason, GenerationParams, ModelType


def backend(**fields: Any) -> EchoBackend:
    return EchoBackend(ReaderConfig.model_validate({"model_name": "echo", "device": "cpu", **fields}))


def run(echo: EchoBackend, text: str, **params: Any) -> tuple[list[str], StepOutput]:
    """Drive one sequence to its end; the pieces of every step, and the final output."""
    echo.admit("r", text, GenerationParams(**params))
    pieces: list[str] = []
    for _ in range(10_000):
        (out,) = echo.step()
        assert out.request_id == "r"
        pieces.append(out.text)
        if out.finish_reason is not None:
            return pieces, out
    raise AssertionError("the sequence never finished")


# ---- tokenization -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello world", "  leading", "trailing  ", "a\nb\n\nc", "tabs\tand\r\nCRLF", "é漢 🙂 x", " ", "", "one"],
)
def test_tokens_join_back_to_the_text(text: str) -> None:
    assert "".join(tokenize(text)) == text


def test_each_token_is_a_word_with_its_leading_whitespace() -> None:
    assert tokenize("the quick  brown\nfox ") == ["the", " quick", "  brown", "\nfox", " "]
    assert tokenize("") == []


# ---- finish reasons ---------------------------------------------------------------------------------------------


def test_echoes_the_prompt_then_stops() -> None:
    echo = backend()
    pieces, final = run(echo, "one two three")
    assert pieces == ["one", " two", " three", ""]
    assert final.finish_reason is FinishReason.STOP
    assert final.n_tokens == 0
    assert (final.prompt_tokens, final.completion_tokens) == (3, 3)
    assert echo.active() == 0


def test_max_new_tokens_gives_length() -> None:
    pieces, final = run(backend(), "one two three four", max_new_tokens=2)
    assert "".join(pieces) == "one two"
    assert final.finish_reason is FinishReason.LENGTH
    assert final.text == " two"  # the last token comes with the final output
    assert final.n_tokens == 1
    assert final.completion_tokens == 2


def test_min_new_tokens_cycles_through_the_prompt() -> None:
    pieces, final = run(backend(), "a b", min_new_tokens=5)
    assert "".join(pieces) == "a ba ba"
    assert final.finish_reason is FinishReason.STOP
    assert final.completion_tokens == 5


def test_ignore_eos_cycles_until_max_new_tokens() -> None:
    pieces, final = run(backend(), "a b c", ignore_eos=True, max_new_tokens=7)
    assert "".join(pieces) == "a b ca b ca"
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == 7


def test_empty_prompt_stops_at_once() -> None:
    pieces, final = run(backend(), "", min_new_tokens=3)
    assert pieces == [""]
    assert final.finish_reason is FinishReason.STOP
    assert (final.prompt_tokens, final.completion_tokens) == (0, 0)


def test_prompt_max_tokens_keeps_the_end() -> None:
    pieces, final = run(backend(), "one two three four", prompt_max_tokens=2)
    assert "".join(pieces) == " three four"
    assert final.prompt_tokens == 2


def test_sequences_are_independent() -> None:
    echo = backend()
    echo.admit("a", "x y", GenerationParams())
    echo.admit("b", "p q r", GenerationParams())
    assert echo.active() == 2
    outputs: dict[str, list[str]] = {"a": [], "b": []}
    finals: dict[str, StepOutput] = {}
    while echo.active():
        for out in echo.step():
            outputs[out.request_id].append(out.text)
            if out.finish_reason is not None:
                finals[out.request_id] = out
    assert "".join(outputs["a"]) == "x y"
    assert "".join(outputs["b"]) == "p q r"
    assert finals["a"].completion_tokens == 2
    assert finals["b"].completion_tokens == 3


def test_abort() -> None:
    echo = backend()
    echo.admit("r", "a b c", GenerationParams())
    assert echo.abort("r") is True
    assert echo.abort("r") is False
    assert echo.active() == 0
    assert echo.step() == []


def test_lora_id_is_refused_not_ignored() -> None:
    echo = backend()
    with pytest.raises(NotSupportedError, match="no LoRA adapters") as info:
        echo.admit("r", "a b", GenerationParams(lora_id="alpha"))
    assert info.value.param == "lora_id"
    assert echo.active() == 0


# ---- max_sequence_length ----------------------------------------------------------------------------------------


def test_prompt_at_max_sequence_length_is_refused() -> None:
    echo = backend(max_sequence_length=4)
    with pytest.raises(ContextLengthExceededError, match="4 tokens but this reader's max_sequence_length is 4"):
        echo.admit("r", "a b c d", GenerationParams())
    assert echo.active() == 0


def test_max_sequence_length_caps_generation() -> None:
    pieces, final = run(backend(max_sequence_length=4), "a b c", ignore_eos=True, max_new_tokens=100)
    assert "".join(pieces) == "a"
    assert final.finish_reason is FinishReason.LENGTH


def test_prompt_max_tokens_makes_a_long_prompt_fit() -> None:
    pieces, final = run(backend(max_sequence_length=5), "a b c d e f g", prompt_max_tokens=2)
    assert "".join(pieces) == " f g"
    assert final.finish_reason is FinishReason.STOP
    pieces, final = run(backend(max_sequence_length=4), "a b c d e f g", prompt_max_tokens=2)
    assert "".join(pieces) == " f g"
    assert final.finish_reason is FinishReason.LENGTH  # 2 prompt + 2 generated fill the 4 tokens


# ---- loading, capacity, notes ------------------------------------------------------------------------------------


def test_load_reports_progress_up_to_one() -> None:
    seen: list[float] = []
    backend().load(seen.append)
    assert seen
    assert seen == sorted(seen)
    assert seen[-1] == 1.0


def test_fail_load_raises_its_message() -> None:
    with pytest.raises(RuntimeError, match="no such weights"):
        backend(backend_options={"fail_load": "no such weights"}).load(lambda _: None)


def test_capacity_and_model_type() -> None:
    assert backend(max_batch_size=3).capacity == 3
    assert backend().capacity == 8
    assert (
        EchoBackend(ReaderConfig(model_name="echo", device="cpu"), BackendContext(default_batch_size=5)).capacity == 5
    )
    assert backend().model_type is ModelType.CAUSAL


def test_notes_list_set_but_unhonoured_options() -> None:
    notes = backend(device="cuda", tensor_parallel=2, quant_type="awq", max_batch_size=4).notes()
    assert len(notes) == 2
    assert "quant_type='awq'" in notes[0]
    assert "tensor_parallel=2" in notes[1]
    assert all("no effect with the echo backend" in note for note in notes)


def test_notes_empty_when_every_option_is_honoured() -> None:
    assert backend(max_batch_size=4, max_sequence_length=10, backend_options={"token_delay_ms": 1}).notes() == []


class _Minimal(GenerativeBackend):
    """A backend honouring only the common options."""

    name = "minimal"

    @property
    def model_type(self) -> ModelType:
        return ModelType.CAUSAL

    def load(self, progress: ProgressCallback) -> None:
        progress(1.0)

    def admit(self, request_id: str, text: str, params: GenerationParams) -> None:
        del request_id, text, params

    def step(self) -> list[StepOutput]:
        return []

    def abort(self, request_id: str) -> bool:
        del request_id
        return False

    def active(self) -> int:
        return 0


def test_base_notes_use_the_backends_honoured_options() -> None:
    config = ReaderConfig(model_name="m", device="cpu", max_sequence_length=10, consumer_group=["a"])
    assert _Minimal(config).notes() == ["max_sequence_length=10 is accepted but has no effect with the minimal backend"]


def test_notes_never_show_the_access_token() -> None:
    from liftoff.backends.echo import EchoBackend
    from liftoff.config.models import ReaderConfig

    notes = EchoBackend(ReaderConfig(model_name="echo", device="cpu", access_token="hf_SECRET123")).notes()
    assert notes == ["access_token='***' is accepted but has no effect: it is used only to fetch a model from the "
                     "Hugging Face hub, and 'echo' was not fetched from it"]  # fmt: skip


def test_access_token_is_honoured_when_the_model_came_from_the_hub() -> None:
    config = ReaderConfig(model_name="org/model", device="cpu", access_token="hf_SECRET123")

    def notes(from_hub: bool) -> list[str]:
        model = ResolvedModel("org/model", Path("/nowhere"), "hf", from_hub=from_hub)
        return _Minimal(config, BackendContext(model=model)).notes()

    assert notes(from_hub=True) == []
    (local,) = notes(from_hub=False)
    assert local.startswith("access_token='***' is accepted but has no effect")
    assert "'org/model' was not fetched from it" in local


def test_options_the_reader_process_applies_are_honoured_by_every_backend() -> None:
    config = ReaderConfig(model_name="m", device="cuda", cuda_visible_devices="1", reader_log_as_json=True,
                          buffer_requests=True, restart_policy="always")  # fmt: skip
    assert _Minimal(config).notes() == []


def test_crash_after_ms_ends_the_process_after_loading() -> None:
    script = (
        "from liftoff.backends.echo import EchoBackend\n"
        "from liftoff.config.models import ReaderConfig\n"
        "import time\n"
        "config = ReaderConfig(model_name='echo', device='cpu', backend_options={'crash_after_ms': 50})\n"
        "EchoBackend(config).load(lambda _: None)\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)
    assert done.returncode == CRASH_EXIT_CODE
