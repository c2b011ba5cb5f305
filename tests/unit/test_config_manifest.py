"""``liftoff.config.manifest``: reader write-back keeps the rest of ``config.yaml`` and replaces it atomically."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from liftoff.config.loader import load_config
from liftoff.config.manifest import ManifestError, add_reader, read_manifest, remove_reader
from liftoff.config.models import ReaderConfig

SOURCE = """\
# Liftoff configuration (top comment)
takeoff:
  server_config:
    port: 4000  # inference port
    reserved_consumers: "primary"
  readers_config:
    # the first reader
    r1:
      model_name: echo
      device: cpu
      consumer_group: 'primary'
other_tool:
  keep: [1, 2, 3]
  nested:
    key: value
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    target = tmp_path / "config.yaml"
    target.write_text(SOURCE, encoding="utf-8")
    return target


def parsed(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def leftovers(directory: Path) -> list[str]:
    """Files beside the manifest other than it and its lock file."""
    return sorted(entry.name for entry in directory.iterdir() if entry.name not in ("config.yaml", ".config.yaml.lock"))


def test_add_reader_keeps_comments_and_other_keys(path: Path) -> None:
    before = parsed(path)
    add_reader(path, "r2", {"model_name": "echo", "device": "cpu", "consumer_group": "extra"})
    text = path.read_text(encoding="utf-8")
    for comment in ("# Liftoff configuration (top comment)", "# inference port", "# the first reader"):
        assert comment in text
    after = parsed(path)
    assert after["other_tool"] == before["other_tool"]
    assert after["takeoff"]["server_config"] == before["takeoff"]["server_config"]
    assert after["takeoff"]["readers_config"]["r1"] == before["takeoff"]["readers_config"]["r1"]
    assert after["takeoff"]["readers_config"]["r2"] == {
        "model_name": "echo",
        "device": "cpu",
        "consumer_group": "extra",
    }


def test_added_reader_loads_back_equal(path: Path) -> None:
    config = ReaderConfig(model_name="echo", device="cpu", consumer_group=["a", "b"], max_batch_size=3)
    add_reader(path, "r2", config.manifest_dict())
    loaded = load_config(config_path=str(path), env={})
    assert loaded.readers["r2"] == config
    assert loaded.server.port == 4000


def test_add_reader_replaces_same_id(path: Path) -> None:
    add_reader(path, "r1", {"model_name": "echo", "device": "cuda"})
    assert parsed(path)["takeoff"]["readers_config"] == {"r1": {"model_name": "echo", "device": "cuda"}}


def test_add_reader_creates_missing_sections(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("takeoff:\n  server_config:\n    port: 4000\n", encoding="utf-8")
    add_reader(target, "r", {"model_name": "echo", "device": "cpu"})
    assert parsed(target)["takeoff"] == {
        "server_config": {"port": 4000},
        "readers_config": {"r": {"model_name": "echo", "device": "cpu"}},
    }
    empty = tmp_path / "empty.yaml"
    empty.write_text("takeoff:\n", encoding="utf-8")
    add_reader(empty, "r", {"model_name": "echo", "device": "cpu"})
    assert read_manifest(empty) == {"readers_config": {"r": {"model_name": "echo", "device": "cpu"}}}


def test_remove_reader_keeps_the_rest(path: Path) -> None:
    add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    remove_reader(path, "r1")
    after = parsed(path)
    assert list(after["takeoff"]["readers_config"]) == ["r2"]
    assert after["other_tool"]["keep"] == [1, 2, 3]
    assert "# inference port" in path.read_text(encoding="utf-8")


def test_add_then_remove_gives_the_file_back(path: Path) -> None:
    add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    remove_reader(path, "r2")
    assert path.read_text(encoding="utf-8") == SOURCE


def test_removing_an_unknown_id_is_a_no_op(path: Path) -> None:
    remove_reader(path, "ghost")
    assert path.read_text(encoding="utf-8") == SOURCE
    assert leftovers(path.parent) == []


def test_write_is_a_rename_of_a_complete_sibling_file(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, Path, str, str]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        seen.append((Path(src), Path(dst), Path(src).read_text(encoding="utf-8"), path.read_text(encoding="utf-8")))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    ((src, dst, new_text, old_text),) = seen
    assert dst == path
    assert src.parent == path.parent  # same filesystem: the rename is atomic
    assert old_text == SOURCE  # the original is untouched until the rename
    assert "r2:" in new_text  # the new content is complete before the rename
    assert path.read_text(encoding="utf-8") == new_text
    assert leftovers(path.parent) == []


def test_failed_write_leaves_file_untouched_and_no_temp_files(path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot be written as YAML"):
        add_reader(path, "bad", {"model_name": object()})
    assert path.read_text(encoding="utf-8") == SOURCE
    assert leftovers(path.parent) == []


def test_concurrent_writes_are_all_kept(path: Path) -> None:
    threads = [
        threading.Thread(target=add_reader, args=(path, f"t{index}", {"model_name": "echo", "device": "cpu"}))
        for index in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(parsed(path)["takeoff"]["readers_config"]) == {"r1"} | {f"t{index}" for index in range(8)}


def test_read_manifest_returns_takeoff_section(path: Path) -> None:
    section = read_manifest(path)
    assert section["server_config"]["port"] == 4000
    assert "other_tool" not in section


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("server_config: {}\n", "No takeoff key"),
        ("- takeoff\n", "No takeoff key"),
        ("", "No takeoff key"),
        ("takeoff: [1, 2]\n", "must be a mapping"),
        ("takeoff: {unclosed\n", "not valid YAML"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str, words: str) -> None:
    target = tmp_path / "config.yaml"
    target.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=words):
        read_manifest(target)


def test_write_keeps_permissions(path: Path) -> None:
    path.chmod(0o644)
    add_reader(path, "r", {"model_name": "echo", "device": "cpu"})
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_goes_through_a_symlink(path: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.yaml"
    link.symlink_to(path)
    add_reader(link, "via-link", {"model_name": "echo", "device": "cpu"})
    assert link.is_symlink()
    assert "via-link" in path.read_text()


def test_removing_an_unknown_id_does_not_rewrite(path: Path) -> None:
    before = path.stat().st_mtime_ns
    path.chmod(0o600)
    remove_reader(path, "not-there")
    assert path.stat().st_mtime_ns == before


def test_empty_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    from liftoff.config.manifest import ManifestError

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ManifestError):
        add_reader(empty, "r", {"model_name": "echo", "device": "cpu"})


def test_the_new_file_and_its_directory_reach_the_disk_before_and_after_the_rename(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    assert events == ["fsync file", "rename", "fsync dir"]


def test_a_file_that_cannot_be_renamed_over_is_an_error_not_a_rewrite_in_place(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(src: Any, dst: Any) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)  # what a file bind-mounted on its own answers
    with pytest.raises(ManifestError, match="mount the directory"):
        add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    assert path.read_text(encoding="utf-8") == SOURCE
    assert leftovers(path.parent) == []


def test_a_manifest_that_is_not_yaml_any_more_is_a_manifest_error(path: Path) -> None:
    path.write_text("takeoff: {unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid YAML"):
        add_reader(path, "r2", {"model_name": "echo", "device": "cpu"})
    assert path.read_text(encoding="utf-8") == "takeoff: {unclosed\n"


def _writer(path: str, prefix: str, count: int) -> None:
    for index in range(count):
        add_reader(Path(path), f"{prefix}{index}", {"model_name": "echo", "device": "cpu"})
        if index % 2:
            remove_reader(Path(path), f"{prefix}{index}")


def test_processes_writing_at_once_lose_nothing(path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(path), prefix, 12)) for prefix in ("a", "b", "c")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    expected = {"r1"} | {f"{prefix}{index}" for prefix in "abc" for index in range(0, 12, 2)}
    assert set(parsed(path)["takeoff"]["readers_config"]) == expected
    assert leftovers(path.parent) == []


def test_set_reader_loras_writes_and_drops_the_key(path: Path) -> None:
    from liftoff.config.manifest import set_reader_loras

    set_reader_loras(path, "r1", ["sql=/adapters/sql", "chat=org/chat-lora"])
    assert "# the first reader" in path.read_text(encoding="utf-8")
    loaded = load_config(config_path=str(path), env={})
    assert loaded.readers["r1"].loras == "sql=/adapters/sql,chat=org/chat-lora"
    set_reader_loras(path, "r1", [])
    assert "loras" not in parsed(path)["takeoff"]["readers_config"]["r1"]
    before = path.read_text(encoding="utf-8")
    set_reader_loras(path, "headless", ["x=/y"])  # a reader the manifest does not hold: left alone
    assert path.read_text(encoding="utf-8") == before
