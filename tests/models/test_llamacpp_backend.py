"""``LlamaCppBackend`` on the bundled SmolLM2-135M-Instruct GGUF: sampling, limits, batching, text, engine.

One backend (capacity 4, 512-token sequences, 2 threads) serves the whole module; every test leaves it empty.
Generations are short so the file stays fast on two cores.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make venv builds it)")

from liftoff.backends.base import BackendContext
from liftoff.backends.llamacpp import backend as llamacpp_module
from liftoff.backends.llamacpp.backend import LlamaCppBackend
from liftoff.backends.resolve import resolve_model
from liftoff.backends.sampling import SamplerState
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError, InvalidRequestError, NotSupportedError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.types import FinishReason, GenerationParams
from liftoff.reader.engine import Engine
from tests.models.runs import Run, drain, step_into

MODEL = "smollm2-135m-instruct"
CONTEXT = 512
CAPACITY = 4
SPECIAL = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>")
REPETITIVE = "one two three one two three one two three one two three"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    resolved = resolve_model(MODEL, tmp_path_factory.mktemp("repository"))
    config = ReaderConfig(
        model_name=MODEL,
        device="cpu",
        max_batch_size=CAPACITY,
        max_sequence_length=CONTEXT,
        prefill_chunk_size=128,
        backend_options={"n_threads": 1, "prefix_cache": False},  # exact numerics: see test_llamacpp_prefix_cache
    )
    backend = LlamaCppBackend(config, BackendContext(model=resolved))
    progress: list[float] = []
    backend.load(progress.append)
    assert progress[-1] == 1.0
    assert progress == sorted(progress)
    yield backend
    backend.close()


@pytest.fixture(autouse=True)
def _empty_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "backend" in request.fixturenames:
        backend: LlamaCppBackend = request.getfixturevalue("backend")
        assert backend.active() == 0, "a test left sequences in the backend"


def generate(backend: LlamaCppBackend, text: str, **params: Any) -> Run:
    backend.admit("solo", text, GenerationParams(**params))
    return drain(backend, {})["solo"]


def generate_many(backend: LlamaCppBackend, requests: dict[str, tuple[str, GenerationParams]]) -> dict[str, Run]:
    for request_id, (text, params) in requests.items():
        backend.admit(request_id, text, params)
    return drain(backend, {})


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[SamplerState]:
    """Every sampler state the backend samples with, in order of first use (to read the chosen token ids)."""
    states: list[SamplerState] = []
    real = llamacpp_module.sample

    def recording(logits: Any, batch: list[SamplerState], eos_ids: Any) -> list[int]:
        for state in batch:
            if not any(state is seen for seen in states):
                states.append(state)
        return real(logits, batch, eos_ids)

    monkeypatch.setattr(llamacpp_module, "sample", recording)
    return states


# ---- loading and options ----------------------------------------------------------------------------------------


def test_refuses_cuda_readers_before_loading() -> None:
    config = ReaderConfig(model_name=MODEL, device="cuda", backend="llamacpp")
    with pytest.raises(RuntimeError, match="transformers backend"):
        LlamaCppBackend(config).load(lambda _: None)


def test_a_missing_lora_fails_the_load_naming_it(tmp_path: Path) -> None:
    from liftoff.backends.lora_files import LoraLoadError

    config = ReaderConfig(model_name=MODEL, device="cpu", max_batch_size=1, loras="sql=adapters/sql")
    backend = LlamaCppBackend(config, BackendContext(repository_path=tmp_path, model=resolve_model(MODEL, tmp_path)))
    with pytest.raises(LoraLoadError, match="LoRA 'sql': 'adapters/sql' is not a local adapter directory"):
        backend.load(lambda _: None)
    assert backend.active() == 0
    assert backend.loras is None


def test_notes_report_unknown_backend_options_only() -> None:
    config = ReaderConfig(
        model_name=MODEL,
        device="cpu",
        max_sequence_length=64,
        prefill_chunk_size=32,
        quant_type="awq",
        backend_options={"n_threads": 2, "bogus": 1},
    )
    notes = LlamaCppBackend(config).notes()
    assert any("quant_type" in note for note in notes)
    assert any("'bogus'" in note for note in notes)
    assert not any(note.startswith(("max_sequence_length=", "prefill_chunk_size=")) for note in notes)
    assert not any("'n_threads'" in note for note in notes)


def test_reports_its_context_length(backend: LlamaCppBackend) -> None:
    assert backend.context_length == CONTEXT
    assert backend.capacity == CAPACITY
    assert backend.model_type == "CAUSAL"


# ---- determinism and batching -----------------------------------------------------------------------------------


def test_greedy_is_deterministic(backend: LlamaCppBackend) -> None:
    first = generate(backend, "The three primary colours are", max_new_tokens=16)
    second = generate(backend, "The three primary colours are", max_new_tokens=16)
    assert first.text == second.text
    assert first.n_tokens == second.n_tokens == 16


def test_batched_greedy_equals_each_prompt_alone(backend: LlamaCppBackend) -> None:
    long_prompt = "Here is a long story about a lighthouse keeper and the sea. " * 24  # 3 chunks of 128
    prompts = {
        "short": "Once upon a time",
        "chat": "Name three rivers in Europe.",
        "code": "def fibonacci(n):\n",
        "long": long_prompt,
    }
    params = {
        request_id: GenerationParams(max_new_tokens=12, use_chat_template=request_id == "chat")
        for request_id in prompts
    }
    alone: dict[str, Run] = {}
    for request_id, text in prompts.items():
        backend.admit(request_id, text, params[request_id])
        alone.update(drain(backend, {}))
    together = generate_many(backend, {rid: (text, params[rid]) for rid, text in prompts.items()})
    # staggered: two start, the others join while they are decoding (prefill beside running streams)
    backend.admit("short", prompts["short"], params["short"])
    backend.admit("long", prompts["long"], params["long"])
    runs: dict[str, Run] = {}
    for _ in range(3):
        step_into(backend, runs)
    backend.admit("chat", prompts["chat"], params["chat"])
    backend.admit("code", prompts["code"], params["code"])
    staggered = drain(backend, runs)
    for request_id in prompts:
        assert together[request_id].text == alone[request_id].text, request_id
        assert staggered[request_id].text == alone[request_id].text, request_id
        assert together[request_id].final == alone[request_id].final


def test_small_prefill_chunks_shared_between_prompts_stay_batch_independent(tmp_path: Path) -> None:
    """With chunks under 64 tokens several prompts share each prefill call; outputs still match runs alone."""
    config = ReaderConfig(
        model_name=MODEL,
        device="cpu",
        max_batch_size=3,
        max_sequence_length=256,
        prefill_chunk_size=16,
        backend_options={"n_threads": 1, "prefill_tokens_per_step": 40},
    )
    small = LlamaCppBackend(config, BackendContext(model=resolve_model(MODEL, tmp_path)))
    small.load(lambda _: None)
    try:
        prompts = {
            "a": "The history of the printing press begins in",
            "b": "A recipe for bread: flour, water, salt and yeast. First, " * 3,
            "c": "Rivers of Europe: the Danube, the Rhine, the Seine, the Loire, the Elbe and",
        }
        params = GenerationParams(max_new_tokens=8)
        alone = {rid: generate(small, text, max_new_tokens=8) for rid, text in prompts.items()}
        runs: dict[str, Run] = {}
        small.admit("b", prompts["b"], params)
        step_into(small, runs)
        small.admit("a", prompts["a"], params)
        small.admit("c", prompts["c"], params)
        together = drain(small, runs)
        for request_id in prompts:
            assert together[request_id].text == alone[request_id].text, request_id
    finally:
        small.close()


def test_abort_frees_the_slot_and_its_cache(backend: LlamaCppBackend) -> None:
    reference = generate(backend, "The weather today is", max_new_tokens=10)
    forever = GenerationParams(max_new_tokens=400, ignore_eos=True)
    for index in range(CAPACITY):
        backend.admit(f"busy{index}", f"Count to one hundred, number {index}:", forever)
    assert backend.active() == CAPACITY
    backend.step()
    backend.step()
    assert backend.abort("busy1")
    assert backend.abort("busy2")
    assert not backend.abort("busy1")
    assert not backend.abort("never-admitted")
    assert backend.active() == CAPACITY - 2
    backend.admit("again", "The weather today is", GenerationParams(max_new_tokens=10))
    backend.admit("more", "Count to ten:", forever)
    assert backend.active() == CAPACITY
    runs: dict[str, Run] = {}
    while "again" not in runs or runs["again"].final is None:
        for out in backend.step():
            run = runs.setdefault(out.request_id, Run())
            run.pieces.append(out.text)
            run.final = out if out.finish_reason else None
    assert runs["again"].text == reference.text  # the reused slot kept nothing of the aborted sequence
    for request_id in ("busy0", "busy3", "more"):
        assert backend.abort(request_id)
    assert backend.active() == 0


def test_prompt_waiting_for_prefill_can_be_aborted(backend: LlamaCppBackend) -> None:
    backend.admit("waiting", "Hello there", GenerationParams(max_new_tokens=5))
    assert backend.active() == 1
    assert backend.abort("waiting")
    assert backend.active() == 0
    assert backend.step() == []


# ---- sampling parameters ----------------------------------------------------------------------------------------

PROMPT = "Write one sentence about the moon."
SAMPLED = {
    "temperature": ({"temperature": 1.5, "top_k": 0}, {"temperature": 0.0, "top_k": 0}),
    "top_k": ({"top_k": 50}, {"top_k": 1}),
    "top_p": ({"top_k": 0, "top_p": 0.95}, {"top_k": 0, "top_p": 0.001}),
}


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampling_parameter_changes_output_and_seed_reproduces_it(backend: LlamaCppBackend, name: str) -> None:
    free, restricted = SAMPLED[name]
    common: dict[str, Any] = {"max_new_tokens": 16, "use_chat_template": True, "seed": 7}
    greedy = generate(backend, PROMPT, max_new_tokens=16, use_chat_template=True)
    sampled = generate(backend, PROMPT, **common, **free)
    again = generate(backend, PROMPT, **common, **free)
    other_seed = generate(backend, PROMPT, **{**common, "seed": 8}, **free)
    narrowed = generate(backend, PROMPT, **common, **restricted)
    assert sampled.text == again.text  # same seed, same output
    assert sampled.text != greedy.text
    assert other_seed.text != sampled.text
    assert narrowed.text == greedy.text  # the restrictive value leaves only the most likely token


def test_repetition_penalty_breaks_a_loop(backend: LlamaCppBackend) -> None:
    greedy = generate(backend, REPETITIVE, max_new_tokens=16)
    penalised = generate(backend, REPETITIVE, max_new_tokens=16, repetition_penalty=1.5)
    assert penalised.text != greedy.text
    words = greedy.text.split()
    assert len(set(words)) < len(words) / 2  # the greedy continuation is a loop
    assert len(set(penalised.text.split())) > len(set(words))


def test_no_repeat_ngram_size_forbids_repeated_ngrams(backend: LlamaCppBackend, recorded: list[SamplerState]) -> None:
    greedy = generate(backend, REPETITIVE, max_new_tokens=16)
    limited = generate(backend, REPETITIVE, max_new_tokens=16, no_repeat_ngram_size=2)
    assert limited.text != greedy.text
    state = recorded[-1]
    tokens = [*state.prompt, *state.generated]
    seen = {tuple(tokens[i : i + 2]) for i in range(len(state.prompt) - 1)}
    for i in range(len(state.prompt) - 1, len(tokens) - 1):
        bigram = tuple(tokens[i : i + 2])
        assert bigram not in seen, f"bigram {bigram} repeated"
        seen.add(bigram)


def test_min_new_tokens_keeps_going_past_the_end(backend: LlamaCppBackend) -> None:
    short = generate(backend, "Say only the word yes.", use_chat_template=True, max_new_tokens=20)
    assert short.reason == FinishReason.STOP
    assert short.final is not None
    assert short.final.completion_tokens < 8
    forced = generate(backend, "Say only the word yes.", use_chat_template=True, max_new_tokens=8, min_new_tokens=8)
    assert forced.reason == FinishReason.LENGTH
    assert forced.final is not None
    assert forced.final.completion_tokens == 8
    assert forced.n_tokens == 8
    assert not SPECIAL.search(forced.text)


def test_max_new_tokens_cuts(backend: LlamaCppBackend) -> None:
    run = generate(backend, "Tell me a long story about dragons.", use_chat_template=True, max_new_tokens=5)
    assert run.reason == FinishReason.LENGTH
    assert run.final is not None
    assert run.final.completion_tokens == 5
    assert run.n_tokens == 5


def test_prompt_max_tokens_keeps_the_end_of_the_prompt(backend: LlamaCppBackend) -> None:
    text = "apples bananas cherries dates figs grapes kiwis lemons mangoes and then"
    tokens = backend.tokenize(text)
    assert len(tokens) > 8
    tail = backend.detokenize(tokens[-8:])
    full = generate(backend, text, max_new_tokens=8)
    cut = generate(backend, text, max_new_tokens=8, prompt_max_tokens=8)
    only_tail = generate(backend, tail, max_new_tokens=8)
    assert full.final is not None
    assert cut.final is not None
    assert full.final.prompt_tokens == len(tokens)
    assert cut.final.prompt_tokens == 8
    assert cut.text == only_tail.text


def test_too_long_prompt_is_refused_with_both_numbers(backend: LlamaCppBackend) -> None:
    text = "word " * 600
    n_tokens = len(backend.tokenize(text))
    with pytest.raises(ContextLengthExceededError, match=rf"has {n_tokens} tokens.*max_sequence_length is {CONTEXT}"):
        backend.admit("long", text, GenerationParams())
    assert backend.active() == 0


def test_output_stops_at_the_context_length(backend: LlamaCppBackend) -> None:
    text = "word " * 500
    n_tokens = len(backend.tokenize(text))
    run = generate(backend, text, max_new_tokens=100, ignore_eos=True)
    assert run.reason == FinishReason.LENGTH
    assert run.final is not None
    assert run.final.completion_tokens == CONTEXT - n_tokens


def test_empty_prompt_starts_from_bos(backend: LlamaCppBackend) -> None:
    run = generate(backend, "", max_new_tokens=4, ignore_eos=True)
    assert run.final is not None
    assert run.final.prompt_tokens == 1
    assert run.final.completion_tokens == 4


def test_unsupported_parameters_are_refused(backend: LlamaCppBackend) -> None:
    with pytest.raises(NotSupportedError, match="constrained_decoding_backend 'outlines' is not available"):
        backend.admit(
            "json", "hi", GenerationParams(json_schema='{"type": "object"}', constrained_decoding_backend="outlines")
        )
    with pytest.raises(NotSupportedError, match="LoRA"):
        backend.admit("lora", "hi", GenerationParams(lora_id="adapter"))
    assert backend.active() == 0


# ---- text -------------------------------------------------------------------------------------------------------


def test_no_special_token_text_in_outputs(backend: LlamaCppBackend) -> None:
    requests = {
        f"chat{index}": (question, GenerationParams(max_new_tokens=48, use_chat_template=True))
        for index, question in enumerate(["Hi!", "What is 2+2?", "Say goodbye."])
    }
    runs = generate_many(backend, requests)
    assert any(run.reason == FinishReason.STOP for run in runs.values())  # the model did emit <|im_end|>
    for run in runs.values():
        assert not SPECIAL.search(run.text)


def test_multibyte_characters_are_never_split(backend: LlamaCppBackend, recorded: list[SamplerState]) -> None:
    run = generate(backend, "Write the Japanese word for cat:", use_chat_template=True, max_new_tokens=20)
    state = recorded[-1]
    assert any(ord(char) > 0x3000 for char in run.text)  # CJK: three bytes, often split over two tokens
    assert "" in run.pieces[:-1]  # some tokens ended inside a character and waited for the next one
    assert all("\ufffd" not in piece for piece in run.pieces)
    assert run.text == backend.detokenize(state.generated)


def test_tokenize_detokenize_round_trip(backend: LlamaCppBackend) -> None:
    text = "Hello world, ça va? 🙂"
    tokens = backend.tokenize(text)
    assert tokens[:2] == ["Hello", "Ġworld"]
    assert backend.detokenize(tokens) == text
    chat = backend.tokenize("hi", use_chat_template=True)
    assert chat[0] == "<|im_start|>"
    assert "<|im_end|>" in chat
    assert backend.detokenize(chat, skip_special_tokens=False).startswith("<|im_start|>system\n")
    assert "<|im_start|>" not in backend.detokenize(chat)
    assert backend.detokenize([1, 28120, 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"


def test_detokenize_refuses_unknown_tokens(backend: LlamaCppBackend) -> None:
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        backend.detokenize(["Ġworld", "not-a-token-xyz"])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        backend.detokenize([10**7])


def test_chat_template_renders_chatml(backend: LlamaCppBackend) -> None:
    rendered = backend.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    without = backend.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert without.startswith("<|im_start|>system\n")
    assert without.endswith("<|im_start|>user\nhi<|im_end|>\n")


# ---- through the reader's engine --------------------------------------------------------------------------------


class Frames:
    """Every emitted frame, with waiting."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def emit(self, frames: list[Any]) -> None:
        with self._cond:
            self.items.extend(frames)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[Any]], bool], timeout: float = 60.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.items), timeout), f"timed out: {self.items!r}"

    def final(self, request_id: str) -> Any:
        def ended(items: list[Any]) -> bool:
            return any(f.request_id == request_id and isinstance(f, FinalFrame | ErrorFrame) for f in items)

        self.wait(ended)
        return next(f for f in self.items if f.request_id == request_id and isinstance(f, FinalFrame | ErrorFrame))

    def tokens(self, request_id: str) -> list[TokenFrame]:
        return [f for f in self.items if f.request_id == request_id and isinstance(f, TokenFrame)]


def test_engine_streams_frames_from_the_backend(backend: LlamaCppBackend) -> None:
    params = GenerationParams(max_new_tokens=10)
    expected = generate(backend, "The ocean is", max_new_tokens=10)
    assert expected.final is not None
    frames = Frames()
    engine = Engine(backend, frames.emit, reader_id="reader-llama")
    engine.start()
    try:
        for index in range(CAPACITY + 2):  # two wait for a free slot
            engine.submit(
                RequestFrame(request_id=f"q{index}", consumer_group="primary", text="The ocean is", params=params)
            )
        engine.submit(
            RequestFrame(
                request_id="forever",
                consumer_group="primary",
                text="Count:",
                params=GenerationParams(max_new_tokens=400, ignore_eos=True),
            )
        )
        engine.submit(
            RequestFrame(request_id="huge", consumer_group="primary", text="word " * 600, params=GenerationParams())
        )
        for index in range(CAPACITY + 2):
            final = frames.final(f"q{index}")
            tokens = frames.tokens(f"q{index}")
            assert isinstance(final, FinalFrame)
            assert final.finish_reason == "length"
            assert (final.completion_tokens, final.prompt_tokens) == (10, expected.final.prompt_tokens)
            assert "".join(token.text for token in tokens) == expected.text
            assert [token.seq for token in tokens] == list(range(len(tokens)))
            assert final.seq == len(tokens)
            assert final.reader_id == "reader-llama"
        error = frames.final("huge")
        assert isinstance(error, ErrorFrame)
        assert error.error_type == "context_length_exceeded"
        frames.wait(lambda items: sum(f.request_id == "forever" for f in items) >= 3)
        engine.abort("forever")
        assert frames.final("forever").finish_reason == "aborted"
    finally:
        engine.stop()
    assert backend.active() == 0


def test_a_conversation_is_rendered_with_the_models_template(backend: LlamaCppBackend) -> None:
    turns = (("system", "You answer in one word."), ("user", "Capital of Italy?"))
    params = GenerationParams(max_new_tokens=4, use_chat_template=True, messages=turns)
    conversation = [{"role": role, "content": content} for role, content in turns]
    rendered = backend.apply_chat_template(conversation, add_generation_prompt=True)
    assert "You answer in one word." in rendered
    assert "You are a helpful AI assistant" not in rendered  # the template's default system prompt is replaced
    model, _ = backend._loaded()
    expected = len(model.tokenize(rendered, add_special=False, parse_special=True))  # special tokens as one each
    assert expected < len(backend.tokenize(rendered, add_special_tokens=False))  # the plain text path splits them
    assert backend.prompt_length("ignored when there are messages", params) == expected
    backend.admit("conversation", "ignored when there are messages", params)
    run = drain(backend, {})["conversation"]
    assert run.final is not None
    assert run.final.prompt_tokens == expected
