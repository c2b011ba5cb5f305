"""``liftoff.backends.transformers.backend``: continuous batching over the slot KV cache, sampling, text, loading.

Most tests run a tiny random Llama (float32, exact); a few run the bundled SmolLM2, dequantized once from its GGUF
file into a tmp repository (see ``conftest.py``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch

from liftoff.backends.base import BackendContext, StepOutput
from liftoff.backends.resolve import ResolvedModel
from liftoff.backends.transformers import convert as hf_convert, load as hf_load
from liftoff.backends.transformers.backend import TransformersBackend
from liftoff.backends.transformers.cache import MaskPolicy, SlotCache
from liftoff.backends.transformers.detok import Detokenizer, TextStream
from liftoff.backends.transformers.load import ModelLoadError, resolve_dtype
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError, InvalidRequestError, NotSupportedError
from liftoff.core.frames import ErrorFrame, FinalFrame, RequestFrame, TokenFrame
from liftoff.core.types import FinishReason, GenerationParams, ModelType
from liftoff.reader.engine import Engine
from tests.models.conftest import Dequantized

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
PROMPTS = {
    "a": "The quick brown fox jumps over the lazy dog.",
    "b": "Once upon a time",
    "c": "In 1905 Einstein published four papers that changed physics: on the photoelectric effect, on Brownian "
    "motion, on special relativity and on the equivalence of mass and energy.",
}


def make_backend(path: Path, fmt: str = "hf", repository: Path | None = None, **fields: Any) -> TransformersBackend:
    # One torch thread: on a shared 2-core machine OpenMP's spinning threads slow small forwards down 10-30x.
    # No prefix cache unless asked for: these tests compare exact numerics (see test_transformers_prefix_cache).
    options = {"dtype": "float32", "n_threads": 1, "prefix_cache": False, **fields.get("backend_options", {})}
    fields["backend_options"] = options
    config = ReaderConfig.model_validate({"model_name": "test-model", "device": "cpu", **fields})
    model = ResolvedModel("test-model", path, fmt)  # type: ignore[arg-type]
    context = BackendContext(repository_path=repository or path.parent, model=model)
    backend = TransformersBackend(config, context)
    backend.load(lambda fraction: None)
    return backend


@dataclass
class Run:
    """Everything one request produced."""

    pieces: list[str] = field(default_factory=list)
    n_tokens: int = 0
    final: StepOutput | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def drain(backend: TransformersBackend, runs: dict[str, Run] | None = None, max_steps: int = 10_000) -> dict[str, Run]:
    """Step until nothing is active; every request's pieces and final output."""
    runs = {} if runs is None else runs
    for _ in range(max_steps):
        if not backend.active():
            return runs
        for out in backend.step():
            run = runs.setdefault(out.request_id, Run())
            assert run.final is None, f"{out.request_id} produced output after it finished"
            run.pieces.append(out.text)
            run.n_tokens += out.n_tokens
            if out.finish_reason is not None:
                run.final = out
    raise AssertionError("the backend never finished")


def generate(backend: TransformersBackend, requests: dict[str, tuple[str, GenerationParams]]) -> dict[str, Run]:
    for request_id, (text, params) in requests.items():
        backend.admit(request_id, text, params)
    return drain(backend)


def greedy(max_new_tokens: int = 12, **params: Any) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params)


@dataclass
class Sampling:
    """One call of the sampler: which requests, the float32 logits they were sampled from, what was chosen."""

    request_ids: list[str]
    logits: Any
    tokens: list[int]


def record_sampling(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> list[Sampling]:
    """Capture every call of the backend's sampler."""
    seen: list[Sampling] = []
    original = backend._sample

    def spy(logits: torch.Tensor, seqs: list[Any]) -> list[int]:
        scores = logits.float().cpu().numpy().copy()
        tokens = original(logits, seqs)
        seen.append(Sampling([seq.request_id for seq in seqs], scores, list(tokens)))
        return tokens

    monkeypatch.setattr(backend, "_sample", spy)
    return seen


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> Iterator[TransformersBackend]:
    backend = make_backend(tiny_llama, max_batch_size=8)
    yield backend
    backend.close()


@pytest.fixture(autouse=True)
def _nothing_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "tiny" in request.fixturenames:
        assert request.getfixturevalue("tiny").active() == 0


# ---- generation on the tiny model ------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_stops_at_max_new_tokens(tiny: TransformersBackend) -> None:
    first = generate(tiny, {"r": (PROMPTS["a"], greedy(10))})["r"]
    second = generate(tiny, {"r": (PROMPTS["a"], greedy(10))})["r"]
    assert first.text == second.text
    assert first.text
    assert first.final is not None
    assert first.final.finish_reason == FinishReason.LENGTH
    assert first.final.completion_tokens == 10
    assert first.n_tokens == 10
    assert first.final.prompt_tokens == len(tiny.tokenize(PROMPTS["a"]))
    assert tiny.model_type == ModelType.CAUSAL


def test_batched_greedy_equals_each_prompt_alone(tiny: TransformersBackend) -> None:
    alone = {key: generate(tiny, {key: (text, greedy(16))})[key].text for key, text in PROMPTS.items()}
    together = generate(tiny, {key: (text, greedy(16)) for key, text in PROMPTS.items()})
    assert {key: run.text for key, run in together.items()} == alone
    # Continuous batching: "c" joins while "a" and "b" are decoding, and "a" finishes early.
    tiny.admit("a", PROMPTS["a"], greedy(5))
    tiny.admit("b", PROMPTS["b"], greedy(16))
    runs: dict[str, Run] = {}
    for _ in range(3):
        for out in tiny.step():
            runs.setdefault(out.request_id, Run()).pieces.append(out.text)
    tiny.admit("c", PROMPTS["c"], greedy(16))
    drain(tiny, runs)
    assert runs["b"].text == alone["b"]
    assert runs["c"].text == alone["c"]
    assert alone["a"].startswith(runs["a"].text)


def test_cached_decode_logits_equal_a_full_forward(tiny: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_sampling(tiny, monkeypatch)
    ids = {key: tiny._model().tokenizer.encode(text) for key, text in PROMPTS.items()}
    generate(tiny, {key: (text, greedy(6)) for key, text in PROMPTS.items()})
    model = tiny._model().model
    checked = 0
    for call in seen:
        for row, (request_id, token) in enumerate(zip(call.request_ids, call.tokens, strict=True)):
            with torch.inference_mode():
                full = model(torch.tensor([ids[request_id]])).logits[0, -1].float().numpy()
            np.testing.assert_allclose(call.logits[row], full, rtol=1e-4, atol=1e-4)
            ids[request_id].append(token)
            checked += 1
    assert checked == 3 * 6


def test_chunked_prefill_and_row_moves_give_the_same_tokens(tiny_llama: Path, tiny: TransformersBackend) -> None:
    expected = {key: generate(tiny, {key: (text, greedy(8))})[key].text for key, text in PROMPTS.items()}
    small = make_backend(tiny_llama, max_batch_size=3, prefill_chunk_size=8)
    try:
        runs = generate(small, {key: (text, greedy(8)) for key, text in PROMPTS.items()})
        assert {key: run.text for key, run in runs.items()} == expected
        assert small.active() == 0
        assert not small._rows
    finally:
        small.close()


def test_the_cache_grows_with_the_longest_sequence(tiny_llama: Path, tiny: TransformersBackend) -> None:
    expected = {key: generate(tiny, {key: (text, greedy(24))})[key].text for key, text in PROMPTS.items()}
    small = make_backend(tiny_llama, max_batch_size=3)
    try:
        cache = small._require_cache()
        small._cache = SlotCache(3, cache.context, dtype=cache.dtype, device=cache.device, initial=4)
        runs = generate(small, {key: (text, greedy(24)) for key, text in PROMPTS.items()})
        assert {key: run.text for key, run in runs.items()} == expected
        longest = max(len(small.tokenize(text)) for text in PROMPTS.values()) + 24
        assert longest <= small._cache.allocated < 2 * longest
    finally:
        small.close()


def test_abort_frees_the_slot_and_the_others_continue_unchanged(tiny: TransformersBackend) -> None:
    alone = {key: generate(tiny, {key: (text, greedy(12))})[key].text for key, text in PROMPTS.items()}
    for key, text in PROMPTS.items():
        tiny.admit(key, text, greedy(12))
    runs: dict[str, Run] = {}
    for _ in range(4):
        for out in tiny.step():
            runs.setdefault(out.request_id, Run()).pieces.append(out.text)
    assert [seq.request_id for seq in tiny._rows] == ["a", "b", "c"]
    assert tiny.abort("a")  # row 0: "c" moves into it
    assert not tiny.abort("a")
    assert tiny.active() == 2
    assert [seq.request_id for seq in tiny._rows] == ["c", "b"]
    drain(tiny, runs)
    assert runs["b"].text == alone["b"]
    assert runs["c"].text == alone["c"]
    tiny.admit("w", PROMPTS["a"], greedy(3))  # waiting requests abort too
    assert tiny.abort("w")
    assert tiny.active() == 0


def test_capacity_is_respected_even_when_over_admitted(tiny_llama: Path) -> None:
    small = make_backend(tiny_llama, max_batch_size=2)
    try:
        for key, text in PROMPTS.items():
            small.admit(key, text, greedy(4))
        small.step()
        assert len(small._rows) == 2
        assert len(small._waiting) == 1
        runs = drain(small)
        assert all(run.final is not None and run.final.completion_tokens == 4 for run in runs.values())
    finally:
        small.close()


def test_masks_windows_and_additive_form() -> None:
    policy = MaskPolicy(windows={"full_attention": None, "sliding_attention": 2})
    masks = policy.decode(torch.tensor([3, 1]), 4)
    assert isinstance(masks, dict)
    assert masks["full_attention"][:, 0, 0].tolist() == [[True] * 4, [True, True, False, False]]
    assert masks["sliding_attention"][:, 0, 0].tolist() == [[False, False, True, True], [True, True, False, False]]
    prefill = MaskPolicy(window=2).prefill(torch.tensor([3, 1]), 0, 3)
    assert isinstance(prefill, torch.Tensor)
    assert prefill[0, 0].tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    assert prefill[1, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]  # padding
    additive = MaskPolicy(additive=torch.float32).decode(torch.tensor([1]), 3)
    assert isinstance(additive, torch.Tensor)
    assert additive[0, 0, 0, :2].tolist() == [0.0, 0.0]
    assert additive[0, 0, 0, 2].item() == torch.finfo(torch.float32).min


# ---- sampling parameters -----------------------------------------------------------------------------------------


def sampled(backend: TransformersBackend, max_new_tokens: int = 12, **params: Any) -> str:
    params.setdefault("top_k", 0)
    return generate(
        backend, {"s": (PROMPTS["b"], GenerationParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params))}
    )["s"].text


def test_seed_makes_sampling_reproducible(tiny: TransformersBackend) -> None:
    assert sampled(tiny, seed=1, temperature=2.0) == sampled(tiny, seed=1, temperature=2.0)
    assert sampled(tiny, seed=1, temperature=2.0) != sampled(tiny, seed=2, temperature=2.0)


def test_temperature_near_zero_is_greedy_and_high_is_not(tiny: TransformersBackend) -> None:
    reference = sampled(tiny, top_k=1)
    assert sampled(tiny, seed=3, temperature=1e-4) == reference
    assert sampled(tiny, seed=3, temperature=0.0) == reference
    assert sampled(tiny, seed=3, temperature=3.0) != reference


def test_top_k_keeps_each_choice_among_the_k_best(tiny: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_sampling(tiny, monkeypatch)

    def ranks(**params: Any) -> list[int]:
        seen.clear()
        sampled(tiny, max_new_tokens=16, seed=5, temperature=5.0, **params)
        return [int((call.logits[0] > call.logits[0][call.tokens[0]]).sum()) for call in seen]

    assert max(ranks(top_k=3)) < 3
    assert max(ranks()) >= 3


def test_top_p_keeps_each_choice_in_the_nucleus(tiny: TransformersBackend) -> None:
    reference = sampled(tiny, top_k=1)
    assert sampled(tiny, seed=7, temperature=1.0, top_p=1e-6) == reference
    assert sampled(tiny, seed=7, temperature=3.0, top_p=1.0) != reference


# ---- prompts and limits ------------------------------------------------------------------------------------------


def test_prompt_max_tokens_keeps_the_end_of_the_prompt(tiny: TransformersBackend) -> None:
    run = generate(tiny, {"p": (PROMPTS["c"], greedy(3, prompt_max_tokens=5))})["p"]
    assert run.final is not None
    assert run.final.prompt_tokens == 5


def test_too_long_prompt_names_both_numbers(tiny_llama: Path) -> None:
    small = make_backend(tiny_llama, max_batch_size=1, max_sequence_length=16)
    try:
        assert small.context_length == 16
        with pytest.raises(ContextLengthExceededError) as caught:
            small.admit("r", PROMPTS["c"], greedy(4))
        prompt_tokens = len(small.tokenize(PROMPTS["c"]))
        assert str(prompt_tokens) in caught.value.message
        assert "16" in caught.value.message
        run = generate(small, {"r": (PROMPTS["a"], greedy(100))})["r"]  # the output is cut at the context
        assert run.final is not None
        assert run.final.finish_reason == FinishReason.LENGTH
        assert run.final.prompt_tokens + run.final.completion_tokens == 16
    finally:
        small.close()


def test_unsupported_parameters_are_refused(tiny: TransformersBackend) -> None:
    with pytest.raises(NotSupportedError, match="constrained_decoding_backend 'outlines' is not available"):
        tiny.admit("r", "x", GenerationParams(json_schema="{}", constrained_decoding_backend="outlines"))
    with pytest.raises(NotSupportedError):
        tiny.admit("r", "x", GenerationParams(lora_id="adapter"))
    assert tiny.active() == 0


def test_zero_new_tokens_and_empty_prompts(tiny: TransformersBackend) -> None:
    runs = generate(tiny, {"zero": ("hello", GenerationParams(max_new_tokens=0)), "empty": ("", greedy(2))})
    assert runs["zero"].final is not None
    assert runs["zero"].final.completion_tokens == 0
    assert runs["empty"].final is not None
    assert runs["empty"].final.prompt_tokens == 1


# ---- text ----------------------------------------------------------------------------------------------------------


def test_chat_template(tiny: TransformersBackend) -> None:
    conversation = [{"role": "user", "content": "Hi there"}]
    rendered = tiny.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi there<|im_end|>" in rendered
    tokens = tiny.tokenize("Hi there", use_chat_template=True)
    assert tokens[0] == "<|im_start|>"
    assert tokens.count("<|im_start|>") == 3
    run = generate(tiny, {"r": ("Hi there", greedy(2, use_chat_template=True))})["r"]
    assert run.final is not None
    assert run.final.prompt_tokens == len(tokens)


def test_tokenize_detokenize_round_trip(tiny: TransformersBackend) -> None:
    text = "Hello world, é漢 🙂 x\n  indented"
    tokens = tiny.tokenize(text)
    assert "Ġworld" in tokens
    assert tiny.detokenize(tokens) == text
    ids = tiny._model().tokenizer.encode(text)
    assert tiny.detokenize(ids) == text
    assert tiny.detokenize(["<|im_start|>", "Hello"]) == "Hello"
    assert tiny.detokenize(["<|im_start|>", "Hello"], skip_special_tokens=False) == "<|im_start|>Hello"
    with pytest.raises(InvalidRequestError):
        tiny.detokenize(["no-such-token-anywhere"])
    with pytest.raises(InvalidRequestError):
        tiny.detokenize([10**9])


def test_detokenizer_never_splits_characters_and_drops_special_tokens(tiny: TransformersBackend) -> None:
    tokenizer = tiny._model().tokenizer
    text = "é漢 🙂 naïve"
    ids = tokenizer.encode(text)
    special = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL[:2]]
    detok = Detokenizer(tokenizer)
    stream = TextStream(tokenizer.encode("Say:"))
    pieces = []
    for token in [special[0], *ids, special[1]]:
        stream.ids.append(token)
        pieces.append(detok.next(stream))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # a partial character was held back
    incomplete = TextStream([])
    incomplete.ids.extend(tokenizer.encode("漢")[:1])  # the first byte(s) of a character only
    assert detok.next(incomplete) == ""
    assert detok.next(incomplete, final=True) == "\ufffd"


def test_tokenizer_services_run_concurrently_with_steps(tiny: TransformersBackend) -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(50):
                assert tiny.detokenize(tiny._model().tokenizer.encode("hello there")) == "hello there"
                tiny.tokenize("hello there", use_chat_template=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    generate(tiny, {key: (text, greedy(20)) for key, text in PROMPTS.items()})
    thread.join()
    assert not errors


# ---- through the engine ----------------------------------------------------------------------------------------


def test_driven_by_the_reader_engine(tiny: TransformersBackend) -> None:
    expected = {key: generate(tiny, {key: (text, greedy(8))})[key].text for key, text in PROMPTS.items()}
    frames: list[Any] = []
    done = threading.Event()

    def emit(batch: list[Any]) -> None:
        frames.extend(batch)
        if sum(isinstance(f, FinalFrame | ErrorFrame) for f in frames) >= len(PROMPTS) + 1:
            done.set()

    engine = Engine(tiny, emit, reader_id="tiny")
    engine.start()
    try:
        for key, text in PROMPTS.items():
            engine.submit(RequestFrame(request_id=key, consumer_group="primary", text=text, params=greedy(8)))
        engine.submit(
            RequestFrame(
                request_id="json",
                consumer_group="primary",
                text="x",
                params=GenerationParams(json_schema="{}", constrained_decoding_backend="lmfe"),
            )
        )
        assert done.wait(30)
    finally:
        engine.stop()
    for key in PROMPTS:
        text = "".join(f.text for f in frames if isinstance(f, TokenFrame) and f.request_id == key)
        final = next(f for f in frames if isinstance(f, FinalFrame) and f.request_id == key)
        assert text == expected[key]
        assert final.completion_tokens == 8
        assert sum(f.n_tokens for f in frames if isinstance(f, TokenFrame) and f.request_id == key) == 8
    error = next(f for f in frames if f.request_id == "json")
    assert isinstance(error, ErrorFrame)
    assert error.error_type == "not_supported"


# ---- loading -------------------------------------------------------------------------------------------------------


def test_non_causal_architectures_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        make_backend(tmp_path)


def test_bad_device_and_dtype_are_clear_errors(tiny_llama: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        make_backend(tiny_llama, backend_options={"dtype": "int3"})
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            make_backend(tiny_llama, device="cuda")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_dtype_is_bf16_only_where_it_is_fast(amx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_load, "cpu_has_amx", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == (torch.bfloat16 if amx else torch.float32)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("BF16", cpu) == torch.bfloat16
    assert resolve_dtype("torch.float32", torch.device("cuda")) == torch.float32


def test_notes_name_ignored_options(tiny_llama: Path) -> None:
    config = ReaderConfig(
        model_name="x", device="cpu", quant_type="awq", backend_options={"dtype": "float32", "colour": "red"}
    )
    notes = TransformersBackend(config).notes()
    assert any("quant_type" in note for note in notes)
    assert any("colour" in note for note in notes)
    assert not any(note.startswith("backend_options 'dtype'") for note in notes)


# ---- the real SmolLM2, dequantized once from its GGUF file ---------------------------------------------------------


def test_gguf_is_dequantized_once_then_reused(
    smollm2_dequantized: Dequantized, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = smollm2_dequantized
    assert (first.checkpoint / hf_convert.MARKER).is_file()
    assert (first.checkpoint / "model.safetensors").is_file()
    assert first.progress[0] == 0.0
    assert first.progress[-1] == 1.0
    assert first.progress == sorted(first.progress)
    assert len(first.progress) > 10

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(hf_convert, "convert_gguf", no_conversion)
    started = time.perf_counter()
    options = {"dtype": "bfloat16"}
    backend = make_backend(first.gguf, "gguf", first.repository, backend_options=options, max_batch_size=2)
    try:
        seconds = time.perf_counter() - started
        assert seconds < first.seconds / 2
        assert backend.context_length == 2048
        params = GenerationParams(max_new_tokens=16, use_chat_template=True)
        run = generate(backend, {"r": ("What is the capital of France?", params)})["r"]
        assert "Paris" in run.text
    finally:
        backend.close()


@pytest.fixture(scope="module")
def smollm2(smollm2_dequantized: Dequantized) -> Iterator[TransformersBackend]:
    backend = make_backend(smollm2_dequantized.checkpoint, max_batch_size=4)  # float32
    yield backend
    backend.close()


def test_smollm2_stops_at_eos_unless_min_new_tokens_or_ignore_eos(smollm2: TransformersBackend) -> None:
    question = "What is the capital of France?"
    runs = generate(
        smollm2,
        {
            "plain": (question, GenerationParams(max_new_tokens=40, use_chat_template=True)),
            "min": (question, GenerationParams(max_new_tokens=40, min_new_tokens=20, use_chat_template=True)),
            "ignore": (question, GenerationParams(max_new_tokens=12, ignore_eos=True, use_chat_template=True)),
        },
    )
    plain, at_least, ignoring = runs["plain"].final, runs["min"].final, runs["ignore"].final
    assert plain is not None
    assert at_least is not None
    assert ignoring is not None
    assert plain.finish_reason == FinishReason.STOP
    assert plain.completion_tokens < 20
    assert "Paris" in runs["plain"].text
    assert at_least.completion_tokens >= 20
    assert ignoring.finish_reason == FinishReason.LENGTH
    assert ignoring.completion_tokens == 12
    for run in runs.values():
        assert not any(token in run.text for token in SPECIAL)


def test_smollm2_batched_greedy_equals_alone(smollm2: TransformersBackend) -> None:
    questions = {"q1": "Name three colours.", "q2": "What is 2 + 2? Answer in one word.", "q3": "Say hello."}
    params = GenerationParams(max_new_tokens=16, use_chat_template=True)
    alone = {key: generate(smollm2, {key: (text, params)})[key].text for key, text in questions.items()}
    together = generate(smollm2, {key: (text, params) for key, text in questions.items()})
    assert {key: run.text for key, run in together.items()} == alone


def test_smollm2_repetition_penalty_and_no_repeat_ngram_size(
    smollm2: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_sampling(smollm2, monkeypatch)
    counting = "Count from one to ten, one number per line."
    kinds: dict[str, dict[str, Any]] = {
        "plain": {},
        "penalty": {"repetition_penalty": 1.5},
        "ngram": {"no_repeat_ngram_size": 2},
    }
    requests = {
        kind: (counting, GenerationParams(max_new_tokens=24, ignore_eos=True, use_chat_template=True, **extra))
        for kind, extra in kinds.items()
    }
    runs = generate(smollm2, requests)
    tokens: dict[str, list[int]] = {kind: [] for kind in kinds}
    for call in seen:
        for request_id, token in zip(call.request_ids, call.tokens, strict=True):
            tokens[request_id].append(token)
    prompt = smollm2._model().tokenizer.encode(
        smollm2.apply_chat_template([{"role": "user", "content": counting}], add_generation_prompt=True)
    )

    def repeats(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    def repeated_bigrams(ids: list[int]) -> int:
        bigrams = list(itertools.pairwise(ids))
        return len(bigrams) - len(set(bigrams))

    assert len({run.text for run in runs.values()}) == 3
    assert repeats(tokens["penalty"]) < repeats(tokens["plain"])
    assert repeated_bigrams(prompt + tokens["plain"]) > repeated_bigrams(prompt)
    assert repeated_bigrams(prompt + tokens["ngram"]) == repeated_bigrams(prompt)  # the prompt has some already


def test_a_conversation_is_rendered_with_the_models_template(tiny: TransformersBackend) -> None:
    turns = (
        ("system", "You answer in one word."),
        ("user", "Capital of Italy?"),
        ("assistant", "Rome."),
        ("user", "And?"),
    )
    params = GenerationParams(max_new_tokens=3, ignore_eos=True, use_chat_template=True, messages=turns)
    conversation = [{"role": role, "content": content} for role, content in turns]
    rendered = tiny.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered.count("<|im_start|>") == 5  # four turns and the generation prompt, no default system turn
    expected = len(tiny.tokenize(rendered, add_special_tokens=False))
    assert tiny.prompt_length("ignored", params) == expected
    final = generate(tiny, {"conversation": ("ignored", params)})["conversation"].final
    assert final is not None
    assert final.prompt_tokens == expected
