"""``liftoff.management.policy``: what ``POST /reader`` may start (how many, how large, which models), and refusals
that tell nothing about files outside ``repository_path``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.management.policy import ReaderLimits, check_model, check_new_reader


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "artefacts"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "config.json").write_text("{}")
    (root / "tiny.gguf").write_text("")
    snapshot = root / "hub" / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def limits(root: Path, **changes: Any) -> ReaderLimits:
    return ReaderLimits(repository_path=root, allowed_models=("org/*", "Qwen/Qwen2-*"), **changes)


def reader(model_name: str, **options: Any) -> ReaderConfig:
    return ReaderConfig(model_name=model_name, device="cpu", **options)


@pytest.mark.parametrize(
    "name", ["echo", "echo:anything", "smollm2-135m-instruct", "ALL-MINILM-L6-V2", "mine", "tiny.gguf", "org/cached"]
)
def test_allowed_models(repository: Path, name: str) -> None:
    check_model(reader(name), limits(repository))


def test_an_absolute_path_inside_the_repository_is_allowed(repository: Path) -> None:
    check_model(reader(str(repository / "mine")), limits(repository))


def test_the_echo_backend_loads_no_file_whatever_the_name(repository: Path) -> None:
    check_model(reader("/etc/passwd", backend="echo"), limits(repository))


def refusal(repository: Path, name: str, **changes: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check_model(reader(name), limits(repository, **changes))
    assert info.value.param == "model_name"
    return info.value


def test_paths_outside_the_repository_are_refused_alike_whether_or_not_they_exist(
    repository: Path, tmp_path: Path
) -> None:
    messages = {
        name: refusal(repository, name).message.replace(repr(name), "NAME")
        for name in (str(tmp_path / "outside"), str(tmp_path / "nothing-here"), "/etc", "/no/such/dir", "escape",
                     "../outside", "~/whatever", "./x")
    }  # fmt: skip
    assert len(set(messages.values())) == 1, messages
    assert "allowed_models" in next(iter(messages.values()))


def test_a_name_relative_to_the_working_directory_is_judged_where_the_reader_would_find_it(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "cached").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the reader would load ./org/cached, outside the repository, before the hub's
    refusal(repository, "org/cached")
    os.chdir(repository)
    check_model(reader("org/cached"), limits(repository))  # now ./org/cached is not there: the cached hub copy


@pytest.mark.parametrize("name", ["evil/model", "Qwen/Qwen3-8B", "org/../x", "org/a/b", "-org/x"])
def test_hub_ids_not_in_allowed_models_are_refused(repository: Path, name: str) -> None:
    refusal(repository, name)


def test_allowed_hub_ids_need_allow_downloads_unless_downloaded(repository: Path) -> None:
    error = refusal(repository, "org/new-model")
    assert "allow_downloads is false" in error.message
    check_model(reader("org/new-model"), limits(repository, allow_downloads=True))
    check_model(reader("Qwen/Qwen2-0.5B"), limits(repository, allow_downloads=True))


def test_max_readers(repository: Path) -> None:
    check_new_reader(reader("echo"), limits(repository, max_readers=2), running=1)
    with pytest.raises(InvalidRequestError, match="max_readers is 2"):
        check_new_reader(reader("echo"), limits(repository, max_readers=2), running=2)


@pytest.mark.parametrize(
    ("options", "param", "words"),
    [
        ({"max_batch_size": 65}, "max_batch_size", "at most 64 (max_reader_batch_size)"),
        ({"max_sequence_length": 5000}, "max_sequence_length", "at most 4096 (max_reader_sequence_length)"),
        ({"prefill_chunk_size": 4097}, "prefill_chunk_size", "at most 4096"),
        ({"backend_options": {"n_batch": 10**6}}, "backend_options.n_batch", "from 0 to 4096"),
        ({"backend_options": {"n_threads": -1}}, "backend_options.n_threads", "from 0 to 4096"),
        ({"backend_options": {"blob": "x" * 5000}}, "backend_options", "over 4096 bytes"),
    ],
)
def test_sizes_over_the_limits_are_refused_naming_the_setting(
    repository: Path, options: dict[str, Any], param: str, words: str
) -> None:
    bounded = limits(repository, max_batch_size=64, max_sequence_length=4096)
    with pytest.raises(InvalidRequestError, match=re.escape(words)) as info:
        check_new_reader(reader("echo", **options), bounded, running=0)
    assert info.value.param == param


def test_sizes_within_the_limits_pass(repository: Path) -> None:
    options = {"max_batch_size": 64, "max_sequence_length": 4096, "backend_options": {"token_delay_ms": 5,
               "quantize": "int8", "prefix_cache": True}}  # fmt: skip
    check_new_reader(reader("echo", **options), limits(repository, max_batch_size=64, max_sequence_length=4096), 0)


def api_reader(**options: Any) -> ReaderConfig:
    return ReaderConfig(model_name="gpt-4o-mini", device="api", **options)


def test_an_api_reader_is_created_for_an_allowed_upstream(repository: Path) -> None:
    allowed = limits(repository, allowed_api_bases=("http://gpu-*:8000/v1", "https://api.openai.com/v1"))
    check_new_reader(api_reader(api_base="http://gpu-3:8000/v1"), allowed, 0)
    check_new_reader(api_reader(), allowed, 0)  # the default upstream, listed


@pytest.mark.parametrize("api_base", [None, "http://attacker.example/v1", "http://gpu-3:8000/v1/../x"])
def test_an_api_reader_for_an_upstream_not_allowed_is_refused(repository: Path, api_base: str | None) -> None:
    with pytest.raises(InvalidRequestError, match="allowed_api_bases") as info:
        check_new_reader(api_reader(api_base=api_base), limits(repository, allowed_api_bases=("http://gpu-3:8000/v1",)),
                         0)  # fmt: skip
    assert info.value.param == "api_base"


def test_an_api_reader_may_not_send_a_file_as_its_key(repository: Path) -> None:
    allowed = limits(repository, allowed_api_bases=("http://gpu-3:8000/v1",))
    with pytest.raises(InvalidRequestError, match="access_token") as info:
        check_new_reader(api_reader(api_base="http://gpu-3:8000/v1", access_token_file="/etc/shadow"), allowed, 0)
    assert info.value.param == "access_token_file"


# ---- LoRA adapters: POST /reader's loras and POST /reader/{id}/loras ----------------------------------------------


def test_loras_follow_the_readers_own_rule_for_hub_ids(repository: Path) -> None:
    """An adapter on the hub is org/name, for the check and for the reader alike: a single name that passes the
    check would fail at load (the reader's find_adapter looks it up with the same is_lora_hub_id)."""
    from liftoff.backends.lora_files import LoraLoadError, find_adapter
    from liftoff.config.loras import is_lora_hub_id
    from liftoff.management.policy import check_lora, check_loras

    allowed = ReaderLimits(repository_path=repository, allowed_models=("*",), allow_downloads=True)
    check_model(reader("single-name-model"), allowed)  # models may still be single names
    with pytest.raises(InvalidRequestError, match=r"LoRA 'solo' \('solo'\) is not an adapter POST /reader may load"):
        check_loras(reader("echo", loras="solo"), allowed)
    with pytest.raises(InvalidRequestError, match=r"org/name"):
        check_lora("solo", "solo", allowed, "POST /reader/{reader_id}/loras", "path")
    assert not is_lora_hub_id("solo")
    with pytest.raises(LoraLoadError, match="no adapter directory at solo"):  # what the reader would answer
        find_adapter("solo", "solo", repository)
    check_lora("chat", "org/chat-lora", allowed, "POST /reader/{reader_id}/loras", "path")  # org/name passes both
    assert is_lora_hub_id("org/chat-lora")
    assert not is_lora_hub_id("org/../x")


def test_runtime_adapters_are_checked_like_loras(repository: Path) -> None:
    from liftoff.management.policy import check_lora

    (repository / "adapters" / "sql").mkdir(parents=True)
    check_lora("sql", str(repository / "adapters" / "sql"), limits(repository), "POST /reader/{id}/loras", "path")
    check_lora("sql", "adapters/sql", limits(repository), "POST /reader/{id}/loras", "path")
    for source in (str(repository.parent / "outside"), "../outside", "other/adapter", "/etc"):
        with pytest.raises(InvalidRequestError, match=re.escape("is not an adapter POST /reader/{id}/loras may load")):
            check_lora("x", source, limits(repository), "POST /reader/{id}/loras", "path")
    with pytest.raises(InvalidRequestError, match="allow_downloads is false"):
        check_lora("x", "org/not-cached", limits(repository), "POST /reader/{id}/loras", "path")
