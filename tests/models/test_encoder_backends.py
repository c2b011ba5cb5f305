"""The transformers encoder backends in process: embeddings against sentence-transformers, classification against
the trained model run directly, truncation, and backend selection by checkpoint kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liftoff.backends.base import BackendContext, EncoderBackend
from liftoff.backends.registry import create_backend
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import ContextLengthExceededError
from liftoff.core.types import ModelType
from tests.models.reranker import pairs

pytest.importorskip("sentence_transformers")

TEXTS = [
    "How do I bake bread?",
    "A recipe: flour, water, salt and yeast, baked for forty minutes.",
    "The stock market fell today.",
    "Ünïcödé text, emoji 🙂 and punctuation!?",
    "word " * 300,
]


def _load(path: Path | str, **fields: object) -> EncoderBackend:
    config = ReaderConfig(model_name=str(path), device="cpu", max_batch_size=8, **fields)  # type: ignore[arg-type]
    backend = create_backend(config, BackendContext(repository_path=Path("/nonexistent")))
    assert isinstance(backend, EncoderBackend)
    backend.load(lambda fraction: None)
    return backend


def _rows(backend: EncoderBackend, inputs: list[tuple[str, str | None]]) -> np.ndarray:
    rows = backend.encode([backend.prepare(text, pair) for text, pair in inputs])
    return np.stack([np.frombuffer(row, dtype="<f4") for row in rows])


def test_embeddings_match_sentence_transformers(minilm: Path) -> None:
    from sentence_transformers import SentenceTransformer

    backend = _load("all-minilm-l6-v2")
    assert backend.model_type is ModelType.EMBEDDING
    ours = _rows(backend, [(text, None) for text in TEXTS])
    reference = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (len(TEXTS), 384)
    assert cosine.min() > 0.999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5), "the Normalize module was not applied"


def test_an_input_alone_and_in_a_padded_batch_embed_the_same(minilm: Path) -> None:
    backend = _load(minilm)
    alone = _rows(backend, [(TEXTS[0], None)])[0]
    batched = _rows(backend, [(TEXTS[4], None), (TEXTS[0], None)])[1]
    assert np.allclose(alone, batched, atol=1e-5)


def test_long_inputs_are_cut_or_refused(minilm: Path) -> None:
    backend = _load(minilm)
    assert backend.max_length == 256
    encoding = backend.prepare(TEXTS[4])
    assert encoding.truncated
    assert encoding.n_tokens == 256
    assert not backend.prepare(TEXTS[0]).truncated
    with pytest.raises(ContextLengthExceededError, match=r"302 tokens .* at most 256"):
        backend.prepare(TEXTS[4], truncate=False)
    strict = _load(minilm, truncate_inputs=False, max_sequence_length=16)
    assert strict.max_length == 16
    with pytest.raises(ContextLengthExceededError):
        strict.prepare(TEXTS[1])
    assert strict.prepare(TEXTS[1], truncate=True).n_tokens == 16


def test_classification_scores_are_the_trained_models_logits(reranker: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backend = _load(reranker)
    assert backend.model_type is ModelType.CLASSIFICATION
    data = pairs()[:24]
    ours = _rows(backend, [(query, document) for query, document, _ in data])
    model = AutoModelForSequenceClassification.from_pretrained(reranker)
    tokenizer = AutoTokenizer.from_pretrained(reranker)
    batch = tokenizer([q for q, _, _ in data], [d for _, d, _ in data], padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).logits.numpy()
    assert ours.shape == (24, 1)
    assert np.allclose(ours, expected, atol=1e-4)
    relevant = [label for _, _, label in data]
    assert all((score > 0) == (label > 0) for score, label in zip(ours[:, 0], relevant, strict=True))


def test_tokenizer_services_of_an_encoder(minilm: Path) -> None:
    backend = _load(minilm)
    tokens = backend.tokenize("Hello world")
    assert tokens == ["[CLS]", "hello", "world", "[SEP]"]
    assert backend.detokenize(tokens) == "hello world"


def test_a_causal_checkpoint_is_not_an_encoder(tiny_llama: Path) -> None:
    config = ReaderConfig(model_name=str(tiny_llama), device="cpu")
    backend = create_backend(config, BackendContext(repository_path=Path("/nonexistent")))
    assert backend.model_type is ModelType.CAUSAL
