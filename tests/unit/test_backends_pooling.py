"""``liftoff.backends.transformers.pooling``: the pooling a sentence-transformers directory declares, and pooling
itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from liftoff.backends.transformers.pooling import PoolingConfigError, PoolingSpec, pool, read_pooling  # noqa: E402


def _st_dir(tmp_path: Path, pooling: dict[str, bool], *, normalize: bool, length: int | None = 128) -> Path:
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    folders = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": i, "path": folders[i], "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(kinds)
    ]
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 4, **pooling}))
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if length:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": length}))
    return tmp_path


def test_plain_checkpoints_get_mean_pooling(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == PoolingSpec("mean", normalize=False, max_seq_length=None)


def test_sentence_transformers_files_are_read(tmp_path: Path) -> None:
    spec = read_pooling(_st_dir(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
                                normalize=True))  # fmt: skip
    assert spec == PoolingSpec("cls", normalize=True, max_seq_length=128)


def test_unsupported_pooling_is_explained(tmp_path: Path) -> None:
    with pytest.raises(PoolingConfigError, match="pooling_mode_weightedmean_tokens is not supported"):
        read_pooling(_st_dir(tmp_path, {"pooling_mode_weightedmean_tokens": True}, normalize=False))


def test_pooling_ignores_padding() -> None:
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(states, mask, PoolingSpec("mean")).tolist() == [[2.0, 1.0]]
    assert pool(states, mask, PoolingSpec("max")).tolist() == [[3.0, 2.0]]
    assert pool(states, mask, PoolingSpec("cls")).tolist() == [[1.0, 0.0]]
    assert pool(states, mask, PoolingSpec("lasttoken")).tolist() == [[3.0, 2.0]]
    unit = pool(states, mask, PoolingSpec("mean", normalize=True))
    assert torch.allclose(unit.norm(dim=1), torch.ones(1))
