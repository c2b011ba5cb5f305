"""LoRA adapters outside the model: the reader options ``loras`` and ``max_loras``, what ``POST /reader`` may load,
how the registry shows a reader's adapters, and how an OpenAI ``model`` names one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from liftoff.config.loras import lora_entries, lora_names
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.core.types import ReaderState
from liftoff.gateway.surfaces.openai import _target
from liftoff.management.policy import ReaderLimits, check_new_reader
from liftoff.management.registry import ReaderRecord, ReaderRegistry, info_for


def reader(loras: object = None, **options: object) -> ReaderConfig:
    return ReaderConfig.model_validate({"model_name": "m", "device": "cpu", "loras": loras} | options)


def test_entries_are_name_equals_path_or_a_path_named_by_its_last_part() -> None:
    config = reader(" sql = adapters/sql-v2 , /models/support-bot/ ,org/chat-lora")
    assert config.loras == "sql = adapters/sql-v2,/models/support-bot/,org/chat-lora"
    assert lora_entries(config.loras) == [
        ("sql", "adapters/sql-v2"),
        ("support-bot", "/models/support-bot/"),
        ("chat-lora", "org/chat-lora"),
    ]
    assert lora_names(config.loras) == "sql,support-bot,chat-lora"
    assert reader(["a=/x", "/y/b"]).loras == "a=/x,/y/b"  # a YAML list
    assert reader(None).loras is None
    assert lora_names(None) is None


@pytest.mark.parametrize(
    ("loras", "says"),
    [
        ("a=/x,a=/y", "'a' appears twice"),
        ("/x/a,/y/a", "'a' appears twice"),
        ("my adapter=/x", "write 'name=path'"),
        ("=/x", "not a valid adapter name"),
        ("a:b=/x", "not a valid adapter name"),
        ("a=", "has no path"),
    ],
)
def test_bad_entries_are_refused_saying_what_to_write(loras: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        reader(loras)


@pytest.mark.parametrize("value", [0, 65])
def test_max_loras_has_bounds(value: int) -> None:
    with pytest.raises(ValidationError, match="max_loras"):
        reader("a=/x", max_loras=value)
    assert reader("a=/x", max_loras=4).max_loras == 4


def test_post_reader_loads_adapters_only_under_the_repository_or_allowed_hub_ids(tmp_path: Path) -> None:
    root = tmp_path / "artefacts"
    (root / "adapters" / "sql").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    limits = ReaderLimits(repository_path=root, allowed_models=("org/*",), allow_downloads=True)
    model = {"model_name": "smollm2-135m-instruct"}
    check_new_reader(reader(f"sql=adapters/sql,abs={root / 'adapters' / 'sql'},org/chat", **model), limits, 0)
    for loras in (f"x={tmp_path / 'outside'}", "x=../outside", "other/chat", "x=/etc"):
        with pytest.raises(InvalidRequestError, match="not an adapter POST /reader may load") as info:
            check_new_reader(reader(loras, **model), limits, 0)
        assert info.value.param == "loras"


def _registry() -> ReaderRegistry:
    registry = ReaderRegistry()
    for reader_id, group, loras in (("r1", "primary", "alpha,beta"), ("r2", "plain", None), ("r3", "side", "gamma")):
        config = ReaderConfig(model_name="m", device="cpu", consumer_group=group, loras=loras)
        registry.add(ReaderRecord(reader_id, config, info_for(config), state=ReaderState.LIVE))
    return registry


def test_the_registry_shows_loras_only_for_readers_that_have_them() -> None:
    registry = _registry()
    status = registry.status([])
    assert status["live_readers"]["r1"]["loras"] == "alpha,beta"
    assert "loras" not in status["live_readers"]["r2"]
    assert registry.masked_status()["live_readers"]["r1"]["loras"] == "alpha,beta"
    assert "loras" not in registry.masked_status()["live_readers"]["r2"]
    assert registry.reader_groups()["primary"][0]["loras"] == "alpha,beta"
    assert registry.live_loras("primary") == ["alpha", "beta"]
    assert registry.live_loras("plain") == []


def test_an_openai_model_names_a_group_or_one_of_its_adapters() -> None:
    registry = _registry()
    assert _target(registry, "primary") == ("primary", None)
    assert _target(registry, "primary:alpha") == ("primary", "alpha")
    assert _target(registry, "primary:nope") == ("primary", "nope")  # the reader says which it has
    assert _target(registry, "gamma") == ("side", "gamma")  # an adapter's name alone, when one group has it
    assert _target(registry, "unknown") == ("unknown", None)  # a group that does not exist: the usual 404


def test_a_runtime_adapter_is_checked_as_an_entry_of_loras() -> None:
    from liftoff.config.loras import join_loras, lora_entry

    assert lora_entry("sql", " adapters/sql ") == ("sql", "adapters/sql")
    for name, source, says in (("my adapter", "/x", "not a valid adapter name"), ("a=b", "/x", "not a valid"),
                               ("a", "/x,/y", "has a comma"), ("a", "  ", "has no path")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            lora_entry(name, source)
    joined = join_loras([("sql", "adapters/sql"), ("chat", "org/chat-lora")])
    assert joined == "sql=adapters/sql,chat=org/chat-lora"
    assert lora_entries(joined) == [("sql", "adapters/sql"), ("chat", "org/chat-lora")]
    assert join_loras([]) is None


def test_heartbeats_carry_the_readers_adapters_unless_a_change_was_just_answered() -> None:
    from liftoff.core.frames import HeartbeatFrame

    registry = _registry()
    registry.on_reader_heartbeat("r2", HeartbeatFrame(timestamp_ms=1, loras="delta"))  # added elsewhere
    assert registry.masked_status()["live_readers"]["r2"]["loras"] == "delta"
    assert registry.live_loras("plain") == ["delta"]
    registry.on_reader_heartbeat("r2", HeartbeatFrame(timestamp_ms=2))  # a reader that tells nothing: kept
    assert registry.live_loras("plain") == ["delta"]
    registry.on_reader_heartbeat("r2", HeartbeatFrame(timestamp_ms=3, loras=""))  # its last one removed
    assert "loras" not in registry.status([])["live_readers"]["r2"]
    registry.set_loras("r1", ["alpha"])  # this gateway's change was answered
    registry.on_reader_heartbeat("r1", HeartbeatFrame(timestamp_ms=4, loras="alpha,beta"))  # sent before it
    assert registry.live_loras("primary") == ["alpha"]
