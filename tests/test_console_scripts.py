"""The installed commands in [project.scripts] point at real CLI entry points, and the module forms run."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "kdlab-train": "kdlab.cli.train:entrypoint",
    "kdlab-experiments": "kdlab.cli.experiments:entrypoint",
    "kdlab-cache": "kdlab.cli.cache:entrypoint",
    "kdlab-synthetic": "kdlab.cli.synthetic:entrypoint",
    "kdlab-average": "kdlab.cli.average:entrypoint",
    "kdlab-predict": "kdlab.cli.predict:entrypoint",
    "kdlab-weights": "kdlab.cli.weights:entrypoint",
}


def test_pyproject_declares_the_cli_scripts() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == SCRIPTS


@pytest.mark.parametrize(("script", "target"), sorted(SCRIPTS.items()))
def test_each_script_target_is_a_cli_entrypoint(script: str, target: str) -> None:
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)) and callable(module.main), script


@pytest.mark.parametrize(
    "module",
    [
        "kdlab.cli.train",
        "kdlab.cli.experiments",
        "kdlab.cli.synthetic",
        "kdlab.average",
        "kdlab.predict",
        "kdlab.cli.weights",
    ],
)
def test_python_dash_m_help_exits_0(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")
