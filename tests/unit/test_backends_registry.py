"""``liftoff.backends.registry``: backend choice by option or model name, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from liftoff.backends.base import BackendContext
from liftoff.backends.echo import EchoBackend
from liftoff.backends.registry import BACKENDS, BackendSelectionError, choose_backend, create_backend
from liftoff.backends.resolve import ModelResolutionError, ResolvedModel
from liftoff.config.models import ReaderConfig


def test_backend_option_wins() -> None:
    assert choose_backend(ReaderConfig(model_name="gpt2", device="cpu", backend="echo")) == "echo"


@pytest.mark.parametrize("name", ["echo", "echo:tiny", "echo:"])
def test_echo_model_names_choose_echo(name: str) -> None:
    assert choose_backend(ReaderConfig(model_name=name, device="cpu")) == "echo"


def test_unknown_backend_option_lists_known_ones() -> None:
    config = ReaderConfig(model_name="echo", device="cpu", backend="vllm")
    with pytest.raises(BackendSelectionError, match=r"unknown backend 'vllm'; choose one of: api, echo, llamacpp"):
        choose_backend(config)


def test_device_api_chooses_the_api_backend_without_resolving_the_model(tmp_path: Path) -> None:
    config = ReaderConfig(model_name="gpt-4o-mini", device="api", api_base="http://127.0.0.1:9/v1")
    assert choose_backend(config) == "api"
    backend = create_backend(config, BackendContext(repository_path=tmp_path))  # no hub lookup for a hosted name
    assert backend.name == "api"
    assert backend.model_type.value == "API"


def _model(fmt: str) -> ResolvedModel:
    return ResolvedModel("m", Path("/models/m.gguf" if fmt == "gguf" else "/models/m"), fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "device", "expected"),
    [("gguf", "cpu", "llamacpp"), ("gguf", "cuda", "transformers"), ("hf", "cpu", "transformers"),
     ("hf", "cuda", "transformers")],
)  # fmt: skip
def test_backend_follows_format_and_device(fmt: str, device: str, expected: str) -> None:
    assert choose_backend(ReaderConfig(model_name="m", device=device), _model(fmt)) == expected  # type: ignore[arg-type]


def test_backend_option_overrides_the_format() -> None:
    config = ReaderConfig(model_name="m", device="cpu", backend="transformers")
    assert choose_backend(config, _model("gguf")) == "transformers"


def test_unresolved_model_cannot_choose() -> None:
    with pytest.raises(BackendSelectionError, match="resolved"):
        choose_backend(ReaderConfig(model_name="gpt2", device="cpu"))


def test_create_backend_instantiates_the_chosen_class() -> None:
    created = create_backend(ReaderConfig(model_name="echo", device="cpu"), BackendContext(default_batch_size=3))
    assert isinstance(created, EchoBackend)
    assert created.capacity == 3


def test_create_backend_reports_an_unknown_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="cannot be reached"):
        create_backend(
            ReaderConfig(model_name="nobody/nothing", device="cpu"), BackendContext(repository_path=tmp_path)
        )


def test_registry_entries_are_module_colon_class() -> None:
    for name, target in BACKENDS.items():
        module, _, cls = target.partition(":")
        assert module.startswith("liftoff.backends."), name
        assert cls, name
