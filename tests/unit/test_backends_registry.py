"""``liftoff.backends.registry``: backend choice by option or model name, and its errors."""

from __future__ import annotations

import pytest

from liftoff.backends.echo import EchoBackend
from liftoff.backends.registry import BACKENDS, BackendSelectionError, choose_backend, create_backend
from liftoff.config.models import ReaderConfig


def test_backend_option_wins() -> None:
    assert choose_backend(ReaderConfig(model_name="gpt2", device="cpu", backend="echo")) == "echo"


@pytest.mark.parametrize("name", ["echo", "echo:tiny", "echo:"])
def test_echo_model_names_choose_echo(name: str) -> None:
    assert choose_backend(ReaderConfig(model_name=name, device="cpu")) == "echo"


def test_unknown_backend_option_lists_known_ones() -> None:
    config = ReaderConfig(model_name="echo", device="cpu", backend="vllm")
    with pytest.raises(BackendSelectionError, match=r"unknown backend 'vllm'; choose one of: echo"):
        choose_backend(config)


@pytest.mark.parametrize("name", ["gpt2", "echoes", "meta-llama/Llama-3-8B"])
def test_no_backend_for_model_names_model_and_device(name: str) -> None:
    with pytest.raises(BackendSelectionError) as info:
        choose_backend(ReaderConfig(model_name=name, device="cuda"))
    assert repr(name) in str(info.value)
    assert "'cuda'" in str(info.value)
    assert "backend option" in str(info.value)


def test_create_backend_instantiates_the_chosen_class() -> None:
    created = create_backend(ReaderConfig(model_name="echo", device="cpu"), default_batch_size=3)
    assert isinstance(created, EchoBackend)
    assert created.capacity == 3


def test_create_backend_propagates_selection_errors() -> None:
    with pytest.raises(BackendSelectionError):
        create_backend(ReaderConfig(model_name="gpt2", device="cpu"))


def test_registry_entries_are_module_colon_class() -> None:
    for name, target in BACKENDS.items():
        module, _, cls = target.partition(":")
        assert module.startswith("liftoff.backends."), name
        assert cls, name
