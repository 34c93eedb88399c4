"""Tests for config resolution: named configs, derivation, precedence, `--set` coercion, errors, CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdlab.cli import train
from kdlab.cli.common import run_cli
from kdlab.config.loader import CONFIGS_ENV, list_named_configs, resolve_config
from kdlab.config.schema import ExperimentConfig, SyntheticDataConfig
from kdlab.errors import ConfigError

SEED_CONFIGS = ("people_b3_teacher", "people_b0_baseline", "quickstart_teacher", "quickstart_baseline")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Use the repository's configs/ unless a test points elsewhere; undo the CLI's logging setup."""
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    logger = logging.getLogger("kdlab")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def cfg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty named-configs directory that `resolve_config` uses instead of configs/."""
    d = tmp_path / "configs"
    d.mkdir()
    monkeypatch.setenv(CONFIGS_ENV, str(d))
    return d


def _write(d: Path, name: str, config: dict[str, Any], base: str | None = None, doc: str = "") -> None:
    lines = [f'"""{doc}"""'] if doc else []
    if base is not None:
        lines.append(f"BASE = {base!r}")
    lines.append(f"CONFIG = {config!r}")
    (d / f"{name}.py").write_text("\n".join(lines) + "\n")


def _without(cfg: ExperimentConfig, *, encoder: bool) -> dict[str, Any]:
    """The config as a dict, minus name/description (and model.encoder if asked)."""
    data = cfg.model_dump()
    data.pop("name")
    data.pop("description")
    if encoder:
        data["model"].pop("encoder")
    return data


def _config_error(spec: str, items: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(spec, items)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- named configs -----------------------------------------------------------------------------------------


def test_seed_configs_are_listed_with_descriptions() -> None:
    listed = list_named_configs()
    for name in SEED_CONFIGS:
        assert listed.get(name, "").strip(), f"{name} missing or without a description: {listed}"


def test_listing_skips_private_files_and_reads_the_first_docstring_line(cfg_dir: Path) -> None:
    _write(cfg_dir, "alpha", {}, doc="First line.\n\nMore text.")
    _write(cfg_dir, "beta", {})
    _write(cfg_dir, "_helper", {}, doc="not a config")
    assert list_named_configs() == {"alpha": "First line.", "beta": ""}


@pytest.mark.parametrize(
    ("name", "encoder"),
    [("people_b3_teacher", "timm-efficientnet-b3"), ("people_b0_baseline", "timm-efficientnet-b0")],
)
def test_people_configs_use_seed_sizes(name: str, encoder: str) -> None:
    cfg = resolve_config(name)
    assert cfg.name == name
    assert cfg.model.encoder == encoder
    assert tuple(cfg.data.input_size) == (640, 640)
    assert tuple(cfg.model.roi_size) == (80, 60)
    assert tuple(cfg.model.mask_size) == (160, 120)
    assert not cfg.distillation.enabled


@pytest.mark.parametrize(
    ("teacher", "student", "teacher_epochs_longer"),
    [("people_b3_teacher", "people_b0_baseline", False), ("quickstart_teacher", "quickstart_baseline", True)],
)
def test_baselines_differ_from_their_teacher_only_in_the_encoder(
    teacher: str, student: str, teacher_epochs_longer: bool
) -> None:
    """...and, in the quickstart, in the teacher's longer schedule (a teacher is trained once, used often)."""
    t, s = resolve_config(teacher), resolve_config(student)
    assert (t.training.epochs > s.training.epochs) == teacher_epochs_longer
    s_same_epochs = s.model_copy(
        update={"training": s.training.model_copy(update={"epochs": t.training.epochs})}
    )
    assert t.training == s_same_epochs.training  # otherwise the same schedule, section by section
    assert t.model.encoder != s.model.encoder
    assert _without(t, encoder=True) == _without(s_same_epochs, encoder=True)
    assert (t.name, s.name) == (teacher, student)
    assert t.description and s.description and t.description != s.description


def test_quickstart_students_share_one_schedule() -> None:
    baseline, distill = resolve_config("quickstart_baseline"), resolve_config("quickstart_distill")
    assert baseline.training == distill.training and baseline.data == distill.data
    assert baseline.model == distill.model and baseline.training.seed == distill.training.seed
    assert distill.distillation.enabled and not baseline.distillation.enabled


def test_quickstart_validation_set_has_at_least_300_rois(tmp_path: Path) -> None:
    """Enough ROIs to resolve a 0.01 difference in target IoU (the generated val split, as configured)."""
    from kdlab.data.coco import read_coco_people
    from kdlab.data.loaders import resolve_data_paths

    cfg = resolve_config("quickstart_baseline", [f"data.synthetic.root={tmp_path}"]).data
    paths = resolve_data_paths(cfg)
    records = read_coco_people(paths.val_annotations, cfg.person_category, cfg.min_box_size)
    assert sum(len(r.people) for r in records) >= 300


def test_quickstart_is_small_and_synthetic() -> None:
    cfg = resolve_config("quickstart_teacher")
    assert cfg.data.synthetic is not None
    assert (
        cfg.data.train_annotations is None and cfg.data.val_images is None
    )  # not the COCO paths of its base
    assert max(cfg.data.input_size) < 640
    assert cfg.training.epochs < resolve_config("people_b3_teacher").training.epochs


# --- derivation --------------------------------------------------------------------------------------------


def test_derived_config_inherits_overrides_and_keeps_its_own_name(cfg_dir: Path) -> None:
    _write(
        cfg_dir,
        "parent",
        {
            "name": "parent_run",
            "description": "from parent",
            "model": {"encoder": "timm-efficientnet-b0", "head_channels": 24},
            "training": {"epochs": 3, "lr": 0.5, "batch_size": 5},
        },
    )
    _write(cfg_dir, "child", {"training": {"lr": 0.25}, "model": {"head_channels": 12}}, base="parent")
    _write(cfg_dir, "grandchild", {"training": {"epochs": 9}}, base="child")

    child = resolve_config("child")
    assert child.name == "child"
    assert child.description == "from parent"
    assert child.model.encoder == "timm-efficientnet-b0"  # sibling key of an overridden one survives
    assert child.model.head_channels == 12
    assert (child.training.epochs, child.training.lr, child.training.batch_size) == (3, 0.25, 5)

    grand = resolve_config("grandchild")
    assert grand.name == "grandchild"
    assert (grand.training.epochs, grand.training.lr, grand.training.batch_size) == (9, 0.25, 5)
    assert grand.model.head_channels == 12

    parent = resolve_config("parent")  # resolving children must not have changed the parent
    assert parent.name == "parent_run"
    assert (parent.training.lr, parent.model.head_channels) == (0.5, 24)


def test_derived_config_can_null_a_base_value(cfg_dir: Path) -> None:
    _write(cfg_dir, "parent", {"data": {"train_annotations": "a.json", "max_rois_per_image": 4}})
    _write(cfg_dir, "child", {"data": {"train_annotations": None}}, base="parent")
    cfg = resolve_config("child")
    assert cfg.data.train_annotations is None
    assert cfg.data.max_rois_per_image == 4


def test_base_cycle_is_a_config_error_naming_the_chain(cfg_dir: Path) -> None:
    _write(cfg_dir, "a", {}, base="b")
    _write(cfg_dir, "b", {}, base="a")
    _write(cfg_dir, "selfish", {}, base="selfish")
    assert "a -> b -> a" in _config_error("a")
    assert "b -> a -> b" in _config_error("b")
    msg = _config_error("selfish")
    assert "'selfish'" in msg and "selfish -> selfish" in msg


def test_unknown_base_is_a_config_error(cfg_dir: Path) -> None:
    _write(cfg_dir, "parent", {})
    _write(cfg_dir, "child", {}, base="parnet")
    msg = _config_error("child")
    assert "parnet" in msg and "'parent'" in msg


def test_py_config_by_path_outside_the_configs_dir(cfg_dir: Path, tmp_path: Path) -> None:
    _write(cfg_dir, "parent", {"training": {"epochs": 4}})
    _write(tmp_path, "mine", {"training": {"batch_size": 3}}, base="parent")
    cfg = resolve_config(str(tmp_path / "mine.py"))
    assert (cfg.name, cfg.training.epochs, cfg.training.batch_size) == ("mine", 4, 3)


def test_py_file_may_derive_from_the_named_config_of_the_same_name(cfg_dir: Path, tmp_path: Path) -> None:
    _write(cfg_dir, "exp", {"training": {"epochs": 4}})
    (tmp_path / "mine").mkdir()
    _write(tmp_path / "mine", "exp", {"training": {"batch_size": 3}}, base="exp")
    cfg = resolve_config(str(tmp_path / "mine" / "exp.py"))
    assert (cfg.name, cfg.training.epochs, cfg.training.batch_size) == ("exp", 4, 3)


# --- precedence --------------------------------------------------------------------------------------------


def test_precedence_defaults_named_set_flags(cfg_dir: Path) -> None:
    _write(cfg_dir, "parent", {"training": {"epochs": 2, "batch_size": 2, "seed": 5}})
    _write(cfg_dir, "exp", {"training": {"epochs": 3, "batch_size": 4}}, base="parent")
    defaults = ExperimentConfig()

    cfg = resolve_config("exp")
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.training.seed) == (3, 4, 5)
    assert cfg.training.lr == defaults.training.lr  # untouched keys keep the schema default

    cfg = resolve_config("exp", ["training.epochs=5", "training.seed=6"])
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.training.seed) == (5, 4, 6)

    cfg = resolve_config("exp", ["training.epochs=5"], {"training.epochs": 7, "training.batch_size": None})
    assert (cfg.training.epochs, cfg.training.batch_size) == (7, 4)

    cfg = resolve_config("exp", [], {"training.epochs": None, "output_dir": "runs_here"})
    assert (cfg.training.epochs, cfg.output_dir) == (3, "runs_here")


def test_later_set_items_win() -> None:
    cfg = resolve_config("quickstart_teacher", ["training.epochs=2", "training.epochs=4"])
    assert cfg.training.epochs == 4


# --- --set coercion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "key", "expected"),
    [
        (["training.epochs=7"], "training.epochs", 7),
        (["training.lr=1e-3"], "training.lr", 1e-3),
        (["training.lr=0.25"], "training.lr", 0.25),
        (["training.deterministic=true"], "training.deterministic", True),
        (["training.channels_last=false"], "training.channels_last", False),
        (["data.max_rois_per_image=5", "data.max_rois_per_image=null"], "data.max_rois_per_image", None),
        (["training.grad_clip_norm=null"], "training.grad_clip_norm", None),
        (["model.encoder_weights=null"], "model.encoder_weights", None),
        (["model.roi_size=40,30"], "model.roi_size", (40, 30)),
        (["model.roi_size=[40,30]"], "model.roi_size", (40, 30)),
        (["model.roi_size=40, 30"], "model.roi_size", (40, 30)),
        (["data.augment.scale_range=0.5,1.5"], "data.augment.scale_range", (0.5, 1.5)),
        (["name=123"], "name", "123"),
        (["description=true"], "description", "true"),
        (["description=a=b,c"], "description", "a=b,c"),
        (["model.encoder=1e-3"], "model.encoder", "1e-3"),
        (["training.amp=bf16"], "training.amp", "bf16"),
        (["training.device=cpu"], "training.device", "cpu"),
        (["training.seed=-3"], "training.seed", -3),
    ],
)
def test_set_coercion(items: list[str], key: str, expected: Any) -> None:
    cfg = resolve_config("quickstart_teacher", items)
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_set_creates_a_missing_optional_section() -> None:
    assert resolve_config("people_b3_teacher").data.synthetic is None
    cfg = resolve_config("people_b3_teacher", ["data.synthetic.train_images=8"])
    assert cfg.data.synthetic is not None
    assert cfg.data.synthetic.train_images == 8
    assert cfg.data.synthetic.val_images == SyntheticDataConfig().val_images


def test_set_can_remove_an_optional_section() -> None:
    assert resolve_config("quickstart_teacher", ["data.synthetic=null"]).data.synthetic is None


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "needles"),
    [
        (["training.epoch=3"], ["'training.epochs'"]),
        (["model.encodr=timm-efficientnet-b0"], ["'model.encoder'"]),
        (["training.loss.dise=1"], ["'training.loss.dice'"]),
        (["training.epochs=abc"], ["training.epochs", "abc"]),
        (["distillation.alpha=1.5"], ["distillation.alpha", "1.5"]),
        (["distillation.alpha=-0.1"], ["distillation.alpha"]),
        (["distillation.temperature=0"], ["distillation.temperature"]),
        (["distillation.temperature=-2"], ["distillation.temperature"]),
        (["training.epochs=0"], ["training.epochs"]),
        (["training.batch_size=0"], ["training.batch_size"]),
        (["model.roi_size=0,30"], ["model.roi_size"]),
        (["model.mask_size=64,-1"], ["model.mask_size"]),
        (["data.input_size=0,192"], ["data.input_size"]),
        (["data.input_size=200,192"], ["data.input_size", "32"]),
        (["training.amp=fp8"], ["training.amp"]),
        (["name=a/b"], ["name"]),
        (["training.epochs"], ["key=value", "training.epochs"]),
    ],
)
def test_bad_set_items_are_one_line_config_errors(items: list[str], needles: list[str]) -> None:
    msg = _config_error("quickstart_teacher", items)
    for needle in needles:
        assert needle in msg, msg


def test_flag_with_unknown_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="training.epochs"):
        resolve_config("quickstart_teacher", [], {"training.epoch": 3})


def test_unknown_config_name_suggests_the_closest() -> None:
    msg = _config_error("quickstart_teachr")
    assert "'quickstart_teacher'" in msg


def test_typo_inside_a_named_config_file(cfg_dir: Path) -> None:
    _write(cfg_dir, "typo", {"training": {"epoch": 3}})
    msg = _config_error("typo")
    assert "training.epoch" in msg and "'training.epochs'" in msg and "typo" in msg
    _write(cfg_dir, "typo2", {"modle": {"encoder": "timm-efficientnet-b0"}})
    assert "'model'" in _config_error("typo2")


def test_bad_value_inside_a_named_config_file(cfg_dir: Path) -> None:
    _write(cfg_dir, "bad", {"distillation": {"alpha": 2}})
    msg = _config_error("bad")
    assert "distillation.alpha" in msg and "bad" in msg


def test_broken_python_config_file(cfg_dir: Path) -> None:
    (cfg_dir / "broken.py").write_text("CONFIG = {\n")
    assert "broken" in _config_error("broken")
    (cfg_dir / "noconfig.py").write_text("X = 1\n")
    assert "CONFIG" in _config_error("noconfig")


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    for missing in (tmp_path / "missing.json", tmp_path / "missing.py"):
        assert str(missing) in _config_error(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    msg = _config_error(str(bad))
    assert str(bad) in msg and "JSON" in msg
    arr = tmp_path / "list.json"
    arr.write_text("[1, 2]")
    assert str(arr) in _config_error(str(arr))


# --- config.json round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items", [[], ["model.roi_size=40,30", "data.max_rois_per_image=3", "training.grad_clip_norm=null"]]
)
def test_config_json_round_trip(tmp_path: Path, items: list[str]) -> None:
    cfg = resolve_config("quickstart_teacher", items, {"training.epochs": 2})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    again = resolve_config(str(path))
    assert again == cfg
    assert again.name == "quickstart_teacher"  # not the file's stem
    with_set = resolve_config(str(path), ["training.epochs=3"])
    assert with_set.training.epochs == 3 and with_set.model == cfg.model


# --- CLI (in-process, nothing trained) ---------------------------------------------------------------------


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_list_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(train.main, ["--list_configs"]) == 0
    out = capsys.readouterr().out
    first_words = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in SEED_CONFIGS:
        assert name in first_words, out


def test_cli_set_typo_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(train.main, ["--config", "quickstart_teacher", "--set", "training.epoch=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:"), err
    assert "training.epochs" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--config", "nope_config"], "nope_config"),
        (["--bogus_flag"], "--bogus_flag"),
        (["--set", "training.epochs=3"], "--config"),
        (["--config", "quickstart_teacher", "--set", "training.epochs=abc"], "training.epochs"),
    ],
)
def test_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert err.strip() == lines[0]


def test_cli_missing_data_file_creates_no_run_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the synthetic validation set is generated relative to the CWD
    argv = [
        "--config", "quickstart_teacher", "--no_progress", "--output_dir", str(tmp_path),
        "--set", "data.train_annotations=/nope.json",
        "data.synthetic.train_images=2", "data.synthetic.val_images=1", "data.synthetic.test_images=0",
    ]  # fmt: skip
    assert run_cli(train.main, argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "/nope.json" in lines[0], lines
    assert not (tmp_path / "quickstart_teacher").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"data"}


def _model_changes(derived: ExperimentConfig, base: ExperimentConfig) -> dict[str, Any]:
    """The model.* fields where `derived` differs from `base`."""
    a, b = derived.model.model_dump(), base.model.model_dump()
    return {k: v for k, v in a.items() if v != b[k]}


def test_fast_student_is_a_lighter_b0_distilled_from_the_b3_teacher() -> None:
    """people_fast_from_b3 halves the student's decoder and head widths (docs/people-model.md, "A faster
    student"), keeps what KD needs to match the teacher, and has fewer parameters than people_b0_from_b3."""
    from kdlab.models.builders import build_model
    from kdlab.models.roi_unet import count_parameters

    names = ("people_fast_from_b3", "people_b0_from_b3", "people_b3_teacher")
    fast, b0, teacher = (resolve_config(n) for n in names)
    assert fast.distillation.enabled and fast.distillation.teacher_experiment == "people_b3_teacher"
    assert fast.model.encoder == b0.model.encoder == "timm-efficientnet-b0"
    assert fast.model.decoder_channels != b0.model.decoder_channels
    assert fast.model.mask_size == teacher.model.mask_size
    assert fast.model.roi_margin == teacher.model.roi_margin
    same = ("training", "data", "distillation", "export")
    assert all(getattr(fast, s) == getattr(b0, s) for s in same)
    assert count_parameters(build_model(fast.model)) < count_parameters(build_model(b0.model))


def test_quickstart_fast_student_makes_the_same_model_change() -> None:
    """quickstart_fast_distill is quickstart_distill with people_fast_from_b3's change made the same relative way
    (the decoder widths of the people student, the head at half its student's width), so the quickstart table
    shows what the fast student costs in accuracy at the same schedule and teacher."""
    fast, distill = resolve_config("quickstart_fast_distill"), resolve_config("quickstart_distill")
    people_fast, people_b0 = resolve_config("people_fast_from_b3"), resolve_config("people_b0_from_b3")
    assert set(_model_changes(people_fast, people_b0)) == {"decoder_channels", "head_channels"}
    assert set(_model_changes(fast, distill)) == {"decoder_channels", "head_channels"}
    assert fast.model.decoder_channels == people_fast.model.decoder_channels
    assert fast.model.head_channels / distill.model.head_channels == (
        people_fast.model.head_channels / people_b0.model.head_channels
    )
    assert fast.training == distill.training and fast.data == distill.data
    assert fast.distillation == distill.distillation
