"""Where named configs are found: $KDLAB_CONFIGS_DIR, then ./configs, then the source checkout's configs/.

The order must work from a wheel (no checkout above the package) and from a checkout (any depth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import loader
from kdlab.config.loader import CONFIGS_ENV, configs_dir, list_named_configs, resolve_config
from kdlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIGS_ENV, raising=False)


def _configs_with(directory: Path, name: str) -> Path:
    configs = directory / "configs"
    configs.mkdir(parents=True)
    (configs / f"{name}.py").write_text(f'"""{name} here."""\nCONFIG = {{"name": "{name}"}}\n')
    return configs


def _fake_package_file(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Pretend loader.py lives at `path` (as in a wheel's site-packages, or another checkout)."""
    path.parent.mkdir(parents=True)
    path.write_text("")
    monkeypatch.setattr(loader, "__file__", str(path))


def test_the_environment_variable_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "elsewhere"
    env_dir.mkdir()
    _configs_with(tmp_path, "in_cwd")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIGS_ENV, str(env_dir))
    assert configs_dir() == env_dir


def test_configs_in_the_current_directory_come_before_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = _configs_with(tmp_path, "only_here")
    monkeypatch.chdir(tmp_path)
    assert configs_dir() == configs
    assert list(list_named_configs()) == ["only_here"]
    assert resolve_config("only_here", [], {}).name == "only_here"


def test_without_local_configs_the_source_checkout_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert configs_dir() == ROOT / "configs"
    assert "quickstart_teacher" in list_named_configs()


def test_the_checkout_is_found_at_any_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    configs = _configs_with(checkout, "deep")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'kdlab'\n")
    _fake_package_file(monkeypatch, checkout / "a" / "b" / "c" / "d" / "kdlab" / "config" / "loader.py")
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert configs_dir() == configs


def test_an_installed_wheel_falls_back_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (tmp_path / "venv" / "configs").mkdir(parents=True)  # a configs/ without pyproject.toml is no checkout
    _fake_package_file(monkeypatch, site / "kdlab" / "config" / "loader.py")
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert configs_dir() == cwd / "configs"
    with pytest.raises(ConfigError, match="no named config 'quickstart_teacher'"):
        resolve_config("quickstart_teacher", [], {})
    _configs_with(cwd, "mine")
    assert configs_dir() == cwd / "configs"
