"""The import-linter contracts in pyproject.toml hold, and they would catch an upward import or an import cycle
inside export/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the kdlab package under `tree/src` with the project's contract."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    script = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", script, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_layers_contract_is_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(
        ROOT / "src" / "kdlab", tmp_path / "src" / "kdlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    # The data layer reaching up into the trainer (engine) is the kind of import the contract exists to stop.
    (tmp_path / "src" / "kdlab" / "data" / "upward.py").write_text(
        "from kdlab.engine import trainer  # noqa\n"
    )
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kdlab.data.upward -> kdlab.engine.trainer" in result.stdout


def test_an_import_cycle_inside_export_breaks_the_export_contract(tmp_path):
    shutil.copytree(
        ROOT / "src" / "kdlab", tmp_path / "src" / "kdlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    # The cycle the split removed: quantization reaching (lazily, inside a function) for a task's exporter,
    # which imports the measurement and graph code below it.
    quantize = tmp_path / "src" / "kdlab" / "export" / "quantize.py"
    lazy = "def _people():\n    from kdlab.export.segmentation import SegmentationExporter  # noqa\n"
    quantize.write_text(quantize.read_text() + "\n\n" + lazy)
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kdlab.export.quantize is not allowed to import kdlab.export.segmentation" in result.stdout
