"""Tensors are born where they are used: every torch factory call in ``dad/`` names its device.

``torch.randperm(n)`` makes a CPU tensor; indexing or comparing device tensors with it fails on a GPU
("Expected all tensors to be on the same device") while every CPU test passes. So each factory call in the
core takes ``device=`` (or is a ``*_like`` / ``new_*`` call, which inherit it), unless it is module state
(the direct argument of ``register_buffer`` or ``nn.Parameter``, which moves with its module) or is marked
CPU-by-design on its line with a reason: ``# cpu: <why>``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

DAD = Path(__file__).resolve().parents[2] / "dad"
FACTORIES = frozenset({
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "eye", "rand", "randn",
    "randint", "randperm", "normal", "scalar_tensor", "tril_indices", "triu_indices", "empty_strided", "Generator",
})
MARK = re.compile(r"#\s*cpu:\s*\S")


def _is_factory(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")


def _module_state(tree: ast.AST) -> set[int]:
    """Ids of factory calls that are the value of ``register_buffer(name, value)`` or ``nn.Parameter(value)``."""
    owned = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "register_buffer" and len(node.args) >= 2:
            owned.add(id(node.args[1]))
        elif name == "Parameter" and node.args:
            owned.add(id(node.args[0]))
    return owned


def unplaced_factory_calls(root: Path = DAD) -> list[str]:
    """``path:line: code`` of every factory call under ``root`` without a device, not module state, not marked."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        owned = _module_state(tree)
        for node in ast.walk(tree):
            if not _is_factory(node) or id(node) in owned or any(k.arg == "device" for k in node.keywords):
                continue
            span = lines[node.lineno - 1: (node.end_lineno or node.lineno)]
            if not any(MARK.search(line) for line in span):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_every_factory_call_in_dad_names_its_device() -> None:
    assert unplaced_factory_calls() == []


def test_the_rule_flags_unplaced_calls_and_accepts_placed_marked_and_module_state(tmp_path: Path) -> None:
    package = tmp_path / "dad"
    package.mkdir()
    (package / "sample.py").write_text(
        "import torch\n"
        "def f(x):\n"
        "    order = torch.randperm(5)\n"
        "    placed = torch.arange(3, device=x.device)\n"
        "    marked = torch.rand(4)  # cpu: the same draws on every device\n"
        "    bare = torch.rand(4)  # cpu:\n"
        "    return torch.zeros_like(x), x.new_zeros(2), torch.Generator()\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        self.register_buffer('t', torch.zeros(0))\n"
        "        self.p = torch.nn.Parameter(torch.tensor(1.0))\n"
    )
    assert [line.split(":")[1] for line in unplaced_factory_calls(package)] == ["3", "6", "7"]
