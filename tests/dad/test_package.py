"""``dad`` is the pure PyTorch core: every module imports with Lightning unavailable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import importlib, pkgutil, sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric"):
    sys.modules[name] = None  # any import of them now raises ImportError
import dad
for info in pkgutil.walk_packages(dad.__path__, "dad."):
    importlib.import_module(info.name)
print(sum(1 for _ in pkgutil.walk_packages(dad.__path__, "dad.")))
"""


def test_every_dad_module_imports_without_lightning() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) >= 20  # the walk found the package's modules


def test_a_lightning_import_in_dad_would_be_caught(tmp_path: Path) -> None:
    package = tmp_path / "dad_probe"
    package.mkdir()
    (package / "__init__.py").write_text("import pytorch_lightning\n")
    probe = _SCRIPT.replace("import dad\n", "import dad_probe as dad\n").replace('"dad."', '"dad_probe."')
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "import of pytorch_lightning halted" in result.stderr
