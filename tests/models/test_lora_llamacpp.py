"""LoRA adapters on the llama.cpp backend, with the real adapters of tests/models/lora.py.

The PEFT adapters ``alpha`` (PINEAPPLE) and ``beta`` (ZEBRA, rsLoRA, other ranks and modules) are converted to GGUF
with llama.cpp's own converter (once, under the test's repository) and served over the bundled SmolLM2 GGUF:
each adapter's word appears only with its ``lora_id``, the base model's answer is the reader's without adapters,
a mixed batch gives what each request gives alone, the adapter's effect on the logits is PEFT's, ``max_loras``
takes the adapters in turn, and an adapter can be added and removed between steps without harming the
sequences that run under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.models.conftest import Dequantized
from tests.models.lora import MAX_TOKENS, QUESTIONS, WORDS, only

pytest.importorskip("llama_cpp")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository for the module, so each adapter is converted once."""
    return tmp_path_factory.mktemp("lora-repository")


def _backend(repository: Path, **options: Any) -> Any:
    from liftoff.backends.base import BackendContext
    from liftoff.backends.llamacpp.backend import LlamaCppBackend
    from liftoff.backends.resolve import resolve_model
    from liftoff.config.models import ReaderConfig

    config = ReaderConfig(model_name="smollm2-135m-instruct", device="cpu", max_batch_size=4,
                          max_sequence_length=256, backend_options={"n_threads": 2}, **options)  # fmt: skip
    resolved = resolve_model(config.model_name, repository)
    backend = LlamaCppBackend(config, BackendContext(repository_path=repository, model=resolved))
    backend.load(lambda _: None)
    return backend


@pytest.fixture(scope="module")
def served(repository: Path, adapters: dict[str, Path]) -> Iterator[Any]:
    backend = _backend(repository, loras=f"alpha={adapters['alpha']},{adapters['beta']}")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def plain(repository: Path) -> Iterator[Any]:
    backend = _backend(repository)
    yield backend
    backend.close()


def _run(backend: Any, requests: dict[str, str | None], question: str = QUESTIONS[0]) -> dict[str, str]:
    """Greedy answers of requests (id -> lora_id) admitted together and stepped to the end."""
    from liftoff.core.types import GenerationParams

    for request_id, lora_id in requests.items():
        params = GenerationParams(max_new_tokens=MAX_TOKENS, use_chat_template=True, lora_id=lora_id)
        backend.admit(request_id, question, params)
    texts = dict.fromkeys(requests, "")
    while backend.active():
        for output in backend.step():
            assert output.error is None, output.error
            texts[output.request_id] += output.text
    return texts


def test_each_adapter_answers_only_with_its_lora_id(served: Any, plain: Any) -> None:
    """alpha and beta (PEFT directories, converted) each give their word; without lora_id the answer is the
    reader's without adapters; the adapter names come from ``name=path`` and from the path."""
    assert served.lora_names() == ["alpha", "beta"]
    alone = {lora: _run(served, {"r": lora})["r"] for lora in ("alpha", "beta", None)}
    only("alpha", alone["alpha"])
    only("beta", alone["beta"])
    assert alone[None] == _run(plain, {"r": None})["r"]
    assert not [word for word in WORDS.values() if word in alone[None]]


def test_a_mixed_batch_gives_what_each_request_gives_alone(served: Any) -> None:
    """Rows of alpha, beta and the base model in one step (one decode each) = each request run alone."""
    requests = {"a": "alpha", "b": "beta", "n": None, "a2": "alpha"}
    alone = {request_id: _run(served, {request_id: lora})[request_id] for request_id, lora in requests.items()}
    assert _run(served, requests) == alone
    for question in QUESTIONS:  # prefill calls of several adapters in one step too
        assert _run(served, {"x": "beta", "y": None}, question) == {
            "x": _run(served, {"x": "beta"}, question)["x"],
            "y": _run(served, {"y": None}, question)["y"],
        }


def test_the_adapters_effect_on_the_logits_is_pefts(
    served: Any, plain: Any, smollm2_dequantized: Dequantized, adapters: dict[str, Path]
) -> None:
    """The change an adapter makes to the next-token log-probabilities, llama.cpp (Q4_1 base) against PEFT (float
    base): close, and the same top token. Checks the conversion, rsLoRA's scale and beta's extra modules."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = served._prompt_ids(served._model, QUESTIONS[1], _params())
    base_cpp = _next_logprobs(plain, prompt, None)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dequantized.checkpoint, dtype=torch.float32)
    with torch.no_grad():
        base_ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1).numpy()
    for name in ("alpha", "beta"):
        peft = PeftModel.from_pretrained(model, str(adapters[name]))
        with torch.no_grad():
            ref = torch.log_softmax(peft(torch.tensor([prompt])).logits[0, -1].float(), -1).numpy()
        peft.unload()
        cpp = _next_logprobs(served, prompt, name)
        assert int(np.argmax(cpp)) == int(np.argmax(ref))
        top = np.argsort(ref)[-20:]
        effect_ref, effect_cpp = ref[top] - base_ref[top], cpp[top] - base_cpp[top]
        assert np.abs(effect_ref).max() > 1.0  # the adapter does change these
        assert np.abs(effect_cpp - effect_ref).max() < 0.35 * np.abs(effect_ref).max()


def _params(lora_id: str | None = None) -> Any:
    from liftoff.core.types import GenerationParams

    return GenerationParams(max_new_tokens=1, use_chat_template=True, lora_id=lora_id)


def _next_logprobs(backend: Any, prompt: list[int], lora_id: str | None) -> Any:
    """The log-probabilities of the token after ``prompt`` under ``lora_id``, from the backend's own decode."""
    captured: list[Any] = []
    original = backend._sample

    def capture(ctx: Any, seqs: list[Any], outputs: list[Any]) -> None:
        logits = ctx.logits(len(seqs))[0].astype(np.float64)
        captured.append(logits - np.logaddexp.reduce(logits))
        original(ctx, seqs, outputs)

    backend._sample = capture
    try:
        _run(backend, {"probe": lora_id}, QUESTIONS[1])
    finally:
        del backend._sample
    return captured[0]


def test_max_loras_takes_the_adapters_in_turn(repository: Path, adapters: dict[str, Path], served: Any) -> None:
    """With max_loras 1 a step decodes the base rows and one adapter's; the adapters alternate and every answer
    is what it is with room for both."""
    expected = _run(served, {"a": "alpha", "b": "beta", "n": None})
    backend = _backend(repository, loras=f"alpha={adapters['alpha']},beta={adapters['beta']}", max_loras=1)
    try:
        decoded: list[list[str]] = []
        original = backend._decode

        def record(ctx: Any, rows: list[Any], outputs: list[Any]) -> None:
            decoded.append([row.request_id for row in rows])
            original(ctx, rows, outputs)

        backend._decode = record
        assert _run(backend, {"a": "alpha", "b": "beta", "n": None}) == expected
    finally:
        backend.close()
    adapter_steps = [rows for rows in decoded if rows != ["n"]]
    assert adapter_steps[:4] == [["a"], ["b"], ["a"], ["b"]]


def test_add_and_remove_between_steps(repository: Path, adapters: dict[str, Path], served: Any) -> None:
    """A reader without adapters gets one (given as the converted .gguf file, named by its stem); removing it
    while a sequence runs under it lets that sequence finish as it would have; new requests are refused."""
    from liftoff.backends.llamacpp.lora import CACHE_DIR
    from liftoff.core.errors import InvalidRequestError, NotFoundError, NotSupportedError
    from liftoff.core.types import GenerationParams

    converted = next((repository / CACHE_DIR).glob("alpha-*.gguf"))
    expected = _run(served, {"a": "alpha"})["a"]
    backend = _backend(repository)
    try:
        with pytest.raises(NotSupportedError, match="no LoRA adapters"):
            _run(backend, {"a": "alpha"})
        backend.install_lora(backend.load_lora("pine", str(converted)))
        assert backend.lora_names() == ["pine"]
        with pytest.raises(InvalidRequestError, match="already an adapter"):
            backend.install_lora(backend.load_lora("pine", str(converted)))
        backend.admit("a", QUESTIONS[0], GenerationParams(max_new_tokens=MAX_TOKENS, use_chat_template=True,
                                                          lora_id="pine"))  # fmt: skip
        text = "".join(output.text for output in backend.step())
        backend.remove_lora("pine")
        assert backend.lora_names() == []
        with pytest.raises(InvalidRequestError, match="it has: none"):
            _run(backend, {"b": "pine"})
        with pytest.raises(NotFoundError):
            backend.remove_lora("pine")
        while backend.active():
            text += "".join(output.text for output in backend.step())
        assert text == expected
        assert backend.loras is not None
        assert not backend.loras._by_key
    finally:
        backend.close()


def test_what_cannot_be_converted_is_refused_with_the_reason(tmp_path: Path, adapters: dict[str, Path]) -> None:
    """No converter: the message says where it was looked for and what to do; a file that is not GGUF is named."""
    from liftoff.backends.llamacpp.lora import adapter_file
    from liftoff.backends.lora_files import LoraLoadError
    from tests.models.tiny import smollm2_gguf

    base = smollm2_gguf()
    assert base is not None
    with pytest.raises(LoraLoadError, match="make setup"):
        adapter_file("alpha", str(adapters["alpha"]), base, tmp_path, token=None, source_dir=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not an adapter")
    with pytest.raises(LoraLoadError, match=r"not a \.gguf LoRA adapter"):
        adapter_file("notes", str(text), base, tmp_path, token=None, source_dir=None)
