"""GPU tests run only where CUDA is present (they skip elsewhere, CI included).

The tiny Llama comes from ``LIFTOFF_TINY_LLAMA`` (a checkpoint directory made by ``tests.models.tiny``, for
machines without the bundled GGUF) or is built as the model tests build it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models.conftest import smollm2_dequantized, tiny_llama

__all__ = ["smollm2_dequantized", "tiny_llama"]  # fixtures the tiny model is built with


@pytest.fixture(scope="session")
def cuda_tiny_llama(request: pytest.FixtureRequest) -> Path:
    """A tiny random Llama checkpoint with the SmolLM2 tokenizer."""
    given = os.environ.get("LIFTOFF_TINY_LLAMA")
    if given:
        return Path(given)
    path: Path = request.getfixturevalue("tiny_llama")
    return path
