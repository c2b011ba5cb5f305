"""How the bench scripts import each other, checked on the AST of every file under ``bench/`` (nothing is imported).

``bench/`` is not a package: a script imports its siblings and the shared package ``common`` (bench/common/) by bare
name, with ``bench/`` on ``sys.path``. Checked here: no import cycle among them (every import counts, wherever it
is); no script imports another's private (underscore) names; ``common`` imports no script; and the files the
tests load by path (bench/common/ports.py, bench/genbench_peers.py) import nothing from ``bench/``, since the
tests do not put it on ``sys.path``. Also: one ``free_ports`` in the repository.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
LOADED_BY_PATH = ("common.ports", "genbench_peers")


def bench_modules() -> dict[str, Path]:
    """Module name (as a script imports it) → file."""
    modules = {path.stem: path for path in BENCH.glob("*.py")}
    for path in (BENCH / "common").glob("*.py"):
        modules["common" if path.stem == "__init__" else f"common.{path.stem}"] = path
    return modules


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """The bench modules ``path`` imports: (module, names taken from it, line)."""
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [alias.name for alias in node.names]
            if node.module in known:
                found.append((node.module, names, node.lineno))
            elif node.module == "common":  # from common import ports
                found += [(f"common.{name}", [], node.lineno) for name in names if f"common.{name}" in known]
    return found


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    modules = bench_modules()
    return {name: imports(path, set(modules)) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_bench_modules() -> None:
    edges = {name: {target for target, _, _ in found} for name, found in graph().items()}
    assert "common.procs" in edges
    assert find_cycle(edges) is None


def test_no_script_imports_private_names_of_another() -> None:
    private = [f"{name}:{line} takes {names} from {target}" for name, found in graph().items()
               for target, names, line in found if any(n.startswith("_") for n in names)]  # fmt: skip
    assert private == []


def test_common_imports_no_script() -> None:
    bad = [f"{name} imports {target}" for name, found in graph().items() if name.startswith("common")
           for target, _, _ in found if not target.startswith("common")]  # fmt: skip
    assert bad == []


def test_files_the_tests_load_by_path_import_nothing_from_bench() -> None:
    edges = graph()
    assert {name: [target for target, _, _ in edges[name]] for name in LOADED_BY_PATH} == {
        name: [] for name in LOADED_BY_PATH
    }


def test_one_free_ports() -> None:
    files = [*BENCH.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "src").rglob("*.py")]
    defined = [str(path.relative_to(ROOT)) for path in files for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef) and node.name == "free_ports"]  # fmt: skip
    assert defined == ["bench/common/ports.py"]
