"""Project hygiene that users rely on: pip requirements in step with pyproject, safe checkpoint loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _names(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        spec = spec.split("#", 1)[0].strip()
        if not spec:
            continue
        name = re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
        out[name] = spec.replace(" ", "")
    return out


def test_requirements_txt_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = _names(project["project"]["dependencies"] + project["dependency-groups"]["dev"])
    listed = _names((ROOT / "requirements.txt").read_text().splitlines())
    assert listed == wanted


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in list((ROOT / "src").rglob("*.py")) + [ROOT / "train_advanced.py"]:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert offenders == []


def test_no_shell_true_subprocesses():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py") if "shell=True" in p.read_text()
    ]
    assert offenders == []


def test_readme_config_reference_is_current():
    from kdlab.config.reference import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text(), (
        "README config reference is stale: regenerate it with `uv run python -m kdlab.config.reference`"
    )


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    text = "\n".join(head)
    assert "pip install uv && uv run python run_experiments.py --configs quickstart" in text
    assert "uv run pytest" in text
