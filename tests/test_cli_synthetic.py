"""The kdlab-synthetic CLI: generates the same dataset as the library call; bad input is one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.synthetic import main
from kdlab.data.synthetic import generate_synthetic_people

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_writes_the_same_bytes_as_the_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--images", "2", "--seed", "9", "--height", "64", "--width", "96"]
    assert run_cli(main, [*argv, "--max_people", "3"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out / "annotations.json"
    ref = generate_synthetic_people(tmp_path / "lib", 2, 9, (64, 96), 1, 3, show_progress=False)
    assert (out / "annotations.json").read_bytes() == ref.read_bytes()
    assert json.loads(ref.read_text())["info"]["image_size"] == [64, 96]
    for jpg in sorted((ref.parent / "images").glob("*.jpg")):
        assert (out / "images" / jpg.name).read_bytes() == jpg.read_bytes()


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--images", "0", "--seed", "1"], "num_images"),
        (["--images", "2", "--seed", "1", "--min_people", "3", "--max_people", "2"], "min_people"),
        (["--images", "two", "--seed", "1"], "--images"),
        (["--images", "2"], "--seed"),
    ],
)
def test_bad_input_is_exit_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], word: str
) -> None:
    out = tmp_path / "cli"
    assert run_cli(main, ["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and word in err[0]
    assert not (out / "annotations.json").exists()


def test_python_dash_m_form_works_and_the_data_module_points_to_it(tmp_path: Path) -> None:
    old = subprocess.run([sys.executable, "-m", "kdlab.data.synthetic", "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert old.returncode == 2 and "kdlab-synthetic" in old.stderr and not (tmp_path / "x").exists()
    module = "kdlab.cli.synthetic"
    out = tmp_path / module
    proc = subprocess.run(
        [sys.executable, "-m", module, "--out", str(out), "--images", "1", "--seed", "2",
         "--height", "64", "--width", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == out / "annotations.json"
