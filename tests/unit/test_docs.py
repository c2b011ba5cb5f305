"""The configuration reference in docs/ is generated from the models and must stay current."""

from __future__ import annotations

from pathlib import Path

from liftoff.config.docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert render() in text, "docs/configuration.md is stale: regenerate it with `python -m liftoff.config.docs`"


def test_readme_opens_with_the_two_commands() -> None:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    assert lines[0] == "# Liftoff"
    assert lines[2].startswith("make serve")
    assert lines[3].startswith("make test")
