"""The package's layering (docs/architecture.md), enforced on the AST of every module under ``src/liftoff``.

Every ``import``/``from ... import`` counts, wherever it is (module level, inside functions, under
``TYPE_CHECKING``), and relative imports are resolved. A layer may always import itself and the root package
``liftoff`` (which itself imports nothing internal). Also checked: the gateway and the echo backend never load torch.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import liftoff

PACKAGE_DIR = Path(liftoff.__file__).resolve().parent
ROOT = "liftoff"
ANYTHING = None

# layer → the other layers it may import (None: anything).
ALLOWED: dict[str, frozenset[str] | None] = {
    "core": frozenset(),
    "config": frozenset({"core"}),
    "protocol": frozenset(),
    "broker": frozenset({"core", "config"}),
    "backends": frozenset({"core", "config"}),
    "reader": frozenset({"core", "config", "broker", "backends"}),
    "management": frozenset({"core", "config", "broker"}),
    "gateway": frozenset({"protocol", "core", "config", "broker", "management", "logs"}),
    "cli": ANYTHING,
    "logs": frozenset(),
    "status_table": frozenset(),
    "__main__": frozenset({"cli"}),
    ROOT: frozenset(),
}


@dataclass(frozen=True)
class Edge:
    """One internal import: the importing module, the imported module, and the line."""

    source: str
    target: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """``liftoff.gateway.http`` → ``gateway``; ``liftoff`` → ``liftoff`` (the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:]) if "." in module else Path()
    base = PACKAGE_DIR / relative
    return (base / "__init__.py").is_file() or base.with_suffix(".py").is_file()


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(source: str, module: str, is_package: bool) -> list[Edge]:
    """The internal modules a module's source imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    edges: list[Edge] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            targets = []
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.append(child if child.startswith(ROOT + ".") and _exists(child) else base)
        else:
            continue
        edges.extend(
            Edge(module, target, node.lineno) for target in targets if target == ROOT or target.startswith(ROOT + ".")
        )
    return edges


def violations(edges: list[Edge]) -> list[str]:
    found = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        allowed = ALLOWED[source]
        if allowed is ANYTHING or target in (source, ROOT) or target in allowed:
            continue
        found.append(f"{edge.source} (line {edge.line}) imports {edge.target}: {source} may not import {target}")
    return found


def all_modules() -> dict[str, tuple[Path, bool]]:
    return {module_name(path): (path, path.name == "__init__.py") for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def all_edges() -> list[Edge]:
    edges = []
    for module, (path, is_package) in all_modules().items():
        edges.extend(imports_of(path.read_text(encoding="utf-8"), module, is_package))
    return edges


# ---- the rules hold ---------------------------------------------------------------------------------------------


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = sorted({layer_of(module) for module in all_modules()} - set(ALLOWED))
    assert unknown == [], f"new top-level modules need a layering rule: {unknown}"


def test_no_layering_violations() -> None:
    assert violations(all_edges()) == []


def test_root_package_imports_nothing_internal() -> None:
    assert [edge for edge in all_edges() if edge.source == ROOT] == []


def test_main_imports_the_cli() -> None:
    targets = {edge.target for edge in all_edges() if edge.source == "liftoff.__main__"}
    assert targets == {"liftoff.cli"}


def test_lazy_backend_targets_stay_in_backends() -> None:
    from liftoff.backends.registry import BACKENDS

    for target in BACKENDS.values():
        module = target.partition(":")[0]
        assert layer_of(module) == "backends", target
        assert _exists(module), target


# ---- the checker sees what it must (so an empty result means something) ----------------------------------------


def test_checker_sees_real_edges() -> None:
    edges = {(edge.source, edge.target) for edge in all_edges()}
    assert ("liftoff.gateway.dispatch", "liftoff.management.registry") in edges
    assert ("liftoff.reader.engine", "liftoff.backends.base") in edges
    assert ("liftoff.cli", "liftoff.gateway.server") in edges  # imported inside a function
    assert ("liftoff.management.manager", "liftoff.config.manifest") in edges  # from liftoff.config import manifest
    assert len(all_modules()) > 30


@pytest.mark.parametrize(
    ("module", "is_package", "source", "bad_target"),
    [
        ("liftoff.core.frames", False, "from liftoff.gateway.http import sse_event", "liftoff.gateway.http"),
        ("liftoff.core.frames", False, "import liftoff.config.models", "liftoff.config.models"),
        ("liftoff.config.loader", False, "from liftoff import broker", "liftoff.broker"),
        ("liftoff.broker.base", False, "def f():\n    from liftoff.reader import engine", "liftoff.reader.engine"),
        ("liftoff.backends.echo", False, "from ..management import registry", "liftoff.management.registry"),
        ("liftoff.reader", True, "from ..gateway.http import x", "liftoff.gateway.http"),
        ("liftoff.management.manager", False, "from liftoff.gateway import dispatch", "liftoff.gateway.dispatch"),
        ("liftoff.gateway.http", False, "from liftoff.reader.engine import Engine", "liftoff.reader.engine"),
        ("liftoff.gateway.http", False, "from liftoff.backends import echo", "liftoff.backends.echo"),
        ("liftoff.protocol.native", False, "from liftoff.core.errors import LiftoffError", "liftoff.core.errors"),
        ("liftoff.logs", False, "from liftoff.core import clock", "liftoff.core.clock"),
        ("liftoff", True, "from liftoff.logs import setup_logging", "liftoff.logs"),
        ("liftoff.__main__", False, "from liftoff.gateway.server import Gateway", "liftoff.gateway.server"),
        (
            "liftoff.core.types",
            False,
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from liftoff.config.models import AppConfig",
            "liftoff.config.models",
        ),
    ],
)
def test_checker_catches_violations(module: str, is_package: bool, source: str, bad_target: str) -> None:
    edges = imports_of(source, module, is_package)
    assert [edge.target for edge in edges] == [bad_target]
    assert len(violations(edges)) == 1


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("liftoff.gateway.apps", "from liftoff import __version__"),
        ("liftoff.gateway.http", "from .dispatch import Collector"),
        ("liftoff.reader.engine", "from liftoff.broker.base import ReaderLink"),
        ("liftoff.cli", "from liftoff.reader.process import ReaderProcess"),
        ("liftoff.core.frames", "import msgspec\nfrom liftoff.core.types import GenerationParams"),
    ],
)
def test_checker_allows_permitted_imports(module: str, source: str) -> None:
    assert violations(imports_of(source, module, is_package=False)) == []


# ---- torch is never imported by the gateway or the echo backend ----------------------------------------------------

HEAVY = ("torch", "transformers", "vllm", "llama_cpp")


def test_gateway_and_echo_do_not_import_torch(tmp_path: Path) -> None:
    # Importable stand-ins: any import of them, even guarded by try/except, would show in sys.modules.
    for name in HEAVY:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("", encoding="utf-8")
    code = textwrap.dedent(
        f"""
        import json, sys
        import liftoff.gateway.server, liftoff.backends.echo, liftoff.backends.registry
        loaded = sorted(name for name in {HEAVY!r} if name in sys.modules)
        import torch
        print(json.dumps({{"loaded": loaded, "fake": torch.__file__}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fake"].startswith(str(tmp_path))  # the stand-in would have been found
    assert report["loaded"] == []
