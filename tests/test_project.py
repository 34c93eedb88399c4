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


def _python_sources() -> list[Path]:
    files = [*(ROOT / "src").rglob("*.py"), ROOT / "train_advanced.py", ROOT / "run_experiments.py"]
    return files + list((ROOT / "benchmarks").rglob("*.py"))


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in _python_sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert offenders == []


def test_no_shell_true_subprocesses():
    offenders = [str(p.relative_to(ROOT)) for p in _python_sources() if "shell=True" in p.read_text()]
    assert offenders == []


def test_subprocesses_get_argument_lists_not_strings():
    call = re.compile(
        r"(subprocess\.(run|Popen|call|check_call|check_output)|os\.(system|popen))\(\s*(f?[\"']|$)"
    )
    offenders = []
    for path in _python_sources():
        text = path.read_text()
        for m in call.finditer(text):
            if m.group(1).startswith("os.") or m.group(4):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)!r}")
    assert offenders == []


def test_only_configs_dir_or_given_paths_are_executed(tmp_path, monkeypatch):
    """A run's config.json and a checkpoint's config are data, never code; names resolve in configs/."""
    from kdlab.config import loader

    executed: list[Path] = []
    real = loader._exec_config_file
    monkeypatch.setattr(loader, "_exec_config_file", lambda p: executed.append(Path(p)) or real(p))
    loader.resolve_config("quickstart_distill", [], {})  # a named config with a BASE chain
    assert executed and all(p.parent == loader.configs_dir() for p in executed)
    cfg = loader.resolve_config("quickstart_baseline", [], {})
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    executed.clear()
    loader.resolve_config(str(path), [], {})
    assert executed == []


def test_config_reference_page_is_current():
    from kdlab.config.reference import REFERENCE_PAGE, reference_markdown, with_reference

    page = (ROOT / REFERENCE_PAGE).read_text(encoding="utf-8")
    assert reference_markdown() in page and with_reference(page) == page, (
        f"{REFERENCE_PAGE} config reference is stale: regenerate it with "
        "`uv run python -m kdlab.config.reference --write` (from the repository root)"
    )


def test_config_reference_write_replaces_only_the_generated_block(tmp_path):
    from kdlab.config.reference import BEGIN_MARKER, END_MARKER, main, reference_markdown

    page = tmp_path / "configs.md"
    page.write_text(f"# intro\n\n{BEGIN_MARKER}\n| stale | table |\n{END_MARKER}\n\nafter\n")
    assert main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text == f"# intro\n\n{BEGIN_MARKER}\n{reference_markdown()}\n{END_MARKER}\n\nafter\n"
    assert main(["--write", str(page)]) == 0 and page.read_text() == text  # idempotent
    page.write_text("# no markers\n")
    assert main(["--write", str(page)]) == 2 and page.read_text() == "# no markers\n"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    text = "\n".join(head)
    assert "pip install uv && uv run python run_experiments.py --configs quickstart" in text
    assert "uv run pytest" in text


def test_readme_stays_an_entry_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move reference text to docs/*.md"


_FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = _INLINE_CODE.sub("", _FENCED.sub("", path.read_text(encoding="utf-8")))
    targets = [m.group(1) for m in _LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # skip http:, mailto: ...


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCED.sub("", path.read_text(encoding="utf-8"))
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _broken_links(root: Path) -> list[str]:
    broken = []
    for page in _markdown_pages(root):
        for target in _relative_links(page):
            file_part, _, fragment = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{page.relative_to(root)}: {target} (no heading with that anchor)")
    return broken


def test_every_relative_link_in_the_docs_resolves():
    assert _broken_links(ROOT) == []


def test_link_checker_finds_broken_links(tmp_path):
    """The checker itself: a missing file and a missing anchor are reported; code and web links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## `run.py`: one run\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#runpy-one-run) [web](https://example.org/x) ![pic](docs/a.md)\n"
        "[gone](docs/gone.md) [bad](docs/a.md#nope) ![pic](docs/gone.png)\n"
        "```\n[in code](docs/code.md)\n```\n`[inline](x.md)`\n"
    )
    assert _broken_links(tmp_path) == [
        "README.md: docs/gone.md (no such file)",
        "README.md: docs/a.md#nope (no heading with that anchor)",
        "README.md: docs/gone.png (no such file)",
    ]
