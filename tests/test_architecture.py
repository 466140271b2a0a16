"""The shape of the code: layers that point one way, no import cycles, no private helpers across packages, and
files and functions a reader can hold in mind.

Layers, bottom up: ``dad`` (pure PyTorch) <- ``datamodules``, ``lightning_modules``, ``callbacks`` <- ``pipeline``
<- ``evaluation`` <- the entry points and ``bench``. Every import counts, wherever it stands: at the top, inside a
function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"dad": 0, "datamodules": 1, "lightning_modules": 1, "callbacks": 1, "pipeline": 2, "evaluation": 3,
          "bench": 4, "train": 4, "eval": 4}
SIZED = ("dad", "datamodules", "lightning_modules", "callbacks", "pipeline", "evaluation")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def _sources() -> Iterator[Path]:
    for name in LAYERS:
        path = ROOT / name
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [ROOT / f"{name}.py"])


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports (``from a import b`` gives ``a.b`` where ``b`` is a module), with its line."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if _file_of(full) is not None else base), node.lineno


def _file_of(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        edges = graph.setdefault(_module(path), set())
        for target, _ in _imports(path):
            if target.split(".")[0] in LAYERS and _file_of(target) is not None and target != _module(path):
                edges.add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_points_up_a_layer() -> None:
    upward = []
    for path in _sources():
        own = LAYERS[_module(path).split(".")[0]]
        for target, line in _imports(path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS[top] > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_no_import_cycles_between_files_or_packages() -> None:
    graph = _graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    for package, targets in packages.items():
        targets.discard(package)
    assert _cycles(graph) == [] and _cycles(packages) == []


def test_no_module_imports_another_packages_private_helpers() -> None:
    """No private module of another package, and no private name of another file (make it public where shared)."""
    private = []
    for path in _sources():
        own = _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LAYERS:
                private += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}"
                            for alias in node.names if alias.name.startswith("_")]
        for target, line in _imports(path):
            parts = target.split(".")
            hidden = [i for i, part in enumerate(parts) if part.startswith("_")]
            owner = ".".join(parts[: hidden[0]]) if hidden else ""
            if parts[0] in LAYERS and hidden and own != owner and not own.startswith(owner + "."):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert private == []


def test_bench_is_a_package_run_with_python_m() -> None:
    assert (ROOT / "bench" / "__init__.py").is_file()
    edits = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py") if "sys.path" in p.read_text()]
    assert edits == []


@pytest.mark.parametrize("package", SIZED)
def test_files_and_functions_stay_readable(package: str) -> None:
    """No file over 300 lines; no function over 60 lines unless a line of its docstring gives the reason
    (``Long because ...``)."""
    long_files, long_functions = [], []
    for path in sorted((ROOT / package).rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                reason = any(line.strip().lower().startswith("long because")
                             for line in (ast.get_docstring(node) or "").splitlines())
                if length > MAX_FUNCTION_LINES and not reason:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_files == [] and long_functions == []
