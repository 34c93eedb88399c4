"""The teacher-output cache: subset rules, config rules, layout, fingerprints, flip replay, ONNX teachers,
and training a student from the cache alone (tiny CPU runs)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdlab.cli.cache import main as cache_main
from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config
from kdlab.data.teacher_cache import CachedPeopleDataset, CacheInfo, draw_subset, subset_size
from kdlab.distill.cache import CacheRequest, load_cache_teacher
from kdlab.distill.cache_segmentation import SegmentationCacheWriter, mirrored_rois, teacher_roi_outputs
from kdlab.errors import ConfigError, DataError
from kdlab.file_hash import file_sha256
from kdlab.tasks import teacher_loader
from tests.helpers import copy_teacher_workspace, error_lines, tiny_args, tree_hashes


# ------------------------------------------------------------------------------------------- subset rules
@pytest.mark.parametrize(
    ("n", "fraction", "cap", "expected"),
    [(10_000, 0.5, None, 5_000), (10_000, 1.0, 1_000, 1_000), (10_000, 0.5, 1_000, 1_000),
     (10_000, 0.05, 1_000, 500), (7, 0.5, None, 3), (96, 0.5, 7, 7), (1, 1.0, None, 1)],
)  # fmt: skip
def test_subset_size_takes_the_fraction_first_then_the_cap(n, fraction, cap, expected):
    assert subset_size(n, fraction, cap) == expected


def test_subset_is_drawn_without_replacement_reproducibly_and_a_cap_keeps_the_same_draw():
    a = draw_subset(10_000, 0.5, None, seed=3, split="train")
    assert len(a) == 5_000 and len(np.unique(a)) == 5_000 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, draw_subset(10_000, 0.5, None, seed=3, split="train"))
    assert not np.array_equal(a, draw_subset(10_000, 0.5, None, seed=4, split="train"))
    assert not np.array_equal(a, draw_subset(10_000, 0.5, None, seed=3, split="val"))
    capped = draw_subset(10_000, 0.5, 1_000, seed=3, split="train")
    assert len(capped) == 1_000 and set(capped) <= set(a)


def test_an_empty_split_is_an_error_naming_the_split():
    with pytest.raises(DataError, match="val split would be empty.*subset_fraction=0.1 of 5 samples"):
        draw_subset(5, 0.1, None, seed=0, split="val")


# ------------------------------------------------------------------------------------------- config rules
@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["distillation.cache.subset_fraction=0"], "subset_fraction"),
        (["distillation.cache.subset_fraction=1.5"], "subset_fraction"),
        (["distillation.cache.max_samples=0"], "max_samples"),
        (["distillation.cache.batch_size=0"], "batch_size"),
        (["distillation.teacher_experiment=null", "distillation.cache.seed=1"], "needs distillation.cache.distillation_data_path"),
        (["distillation.enabled=false", "distillation.cache.distillation_data_path=x.hdf5"], "needs distillation.enabled=true"),
        (["distillation.cache.distillation_data_path=x.hdf5", "distillation.features=[{\"student\": \"head\", \"teacher\": \"head\"}]"], "features needs a live teacher"),
        (["distillation.cache.distillation_data_path=x.hdf5", "distillation.teachers=[{\"checkpoint\": \"t.pth\"}]"], "several teachers"),
        (["distillation.cache.distillation_data_path=x.hdf5", "distillation.cache.typo=1"], "typo"),
    ],
)  # fmt: skip
def test_cache_config_rules(items, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("quickstart_distill", items)


def test_a_cache_with_only_a_path_is_a_valid_distillation_without_a_teacher():
    cfg = resolve_config(
        "quickstart_distill",
        ["distillation.teacher_experiment=null", "distillation.cache.distillation_data_path=c.h5"],
    )
    assert cfg.distillation.cache.subset_fraction == 1.0 and cfg.distillation.cache.max_samples is None
    assert cfg.distillation.cache.batch_size == 32


# ---------------------------------------------------------------------------------------- flip symmetry
def test_mirrored_rois_mirror_x_and_shift_the_batch_index():
    rois = torch.tensor([[0.0, 2.0, 3.0, 10.0, 20.0], [1.0, 0.0, 0.0, 64.0, 8.0]])
    got = mirrored_rois(rois, 64, 2)
    assert torch.equal(got, torch.tensor([[2.0, 54.0, 3.0, 62.0, 20.0], [3.0, 0.0, 0.0, 64.0, 8.0]]))


def test_symmetrized_teacher_outputs_are_exactly_flip_equivariant():
    """The reason for symmetrize_flips: a plain UNet is not flip-equivariant, the symmetrized one is."""
    from kdlab.distill.cache import CacheTeacher
    from kdlab.models.builders import build_model

    cfg = resolve_config(
        "quickstart_teacher", ["model.encoder=timm-efficientnet-b0", "model.mask_size=32,24"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()

    def run(images, rois):
        with torch.no_grad():
            out = model(images, rois)
        return {h: out[h].float() for h in ("logits", "bg_fg_logits", "target_logits")}

    teacher = CacheTeacher("m", "pth", "0" * 64, {}, ["logits", "bg_fg_logits", "target_logits"], run)
    images = torch.rand(2, 3, 64, 64)
    rois = torch.tensor(
        [[0.0, 5.0, 4.0, 40.0, 60.0], [1.0, 20.0, 10.0, 63.0, 50.0], [1.0, 0.0, 0.0, 30.0, 30.0]]
    )
    flipped = (images.flip(-1), mirrored_rois(rois, 64, 0))
    sym, sym_flipped = (
        teacher_roi_outputs(teacher, images, rois, True),
        teacher_roi_outputs(teacher, *flipped, True),
    )
    raw, raw_flipped = run(images, rois), run(*flipped)
    for head in sym:
        assert torch.allclose(sym[head].flip(-1), sym_flipped[head], atol=1e-4), head
    raw_gap = (raw["logits"].flip(-1) - raw_flipped["logits"]).abs().max().item()
    assert raw_gap > 1e-3  # without symmetrizing, a replayed flip would be approximate


# ------------------------------------------------------------------------------------------ end to end
TINY = [
    "data.synthetic.train_images=8", "data.synthetic.val_images=4", "data.synthetic.test_images=4",
    "data.synthetic.image_size=64,64", "data.input_size=64,64", "data.num_workers=0", "model.roi_size=16,12",
    "model.mask_size=32,24", "model.head_channels=16",
]  # fmt: skip


def tiny_set(tmp: Path, *extra: str) -> list[str]:
    return [f"data.synthetic.root={tmp / 'data'}", *TINY, *extra]


@pytest.fixture(scope="module")
def teacher(trained_teacher_root, tmp_path_factory) -> tuple[Path, Path]:
    """(workspace, teacher checkpoint): a copy of the session teacher and its data; caches are written here."""
    return copy_teacher_workspace(trained_teacher_root, tmp_path_factory.mktemp("cache_teacher"))


def generate(tmp: Path, teacher_path: Path, out: Path, *flags: str, sets: tuple[str, ...] = ()) -> int:
    argv = ["generate", "--teacher", str(teacher_path), "--config", "quickstart_distill", "--out", str(out),
            "--no_progress", "--batch_size", "3", *flags, "--set", *tiny_set(tmp, *sets)]  # fmt: skip
    return run_cli(cache_main, argv)


@pytest.fixture(scope="module")
def cache_file(teacher) -> Path:
    tmp, ckpt = teacher
    out = tmp / "caches" / "half_cap3.hdf5"
    assert generate(tmp, ckpt, out, "--subset_fraction", "0.5", "--max_samples", "3", "--seed", "5") == 0
    return out


def test_generated_layout_and_attributes(teacher, cache_file):
    tmp, ckpt = teacher
    with h5py.File(cache_file, "r") as f:
        assert set(f) == {"train", "val"}
        assert f.attrs["teacher_sha256"] == file_sha256(ckpt)
        assert json.loads(f.attrs["teacher_config"])["model"]["encoder"] == "timm-efficientnet-b3"
        assert json.loads(f.attrs["preprocessing"])["input_size"] == [64, 64]
        assert (
            f.attrs["subset_seed"] == 5 and f.attrs["subset_fraction"] == 0.5 and f.attrs["max_samples"] == 3
        )
        for split, n_source in (("train", 8), ("val", 4)):
            group = f[split]
            n = min(int(n_source * 0.5), 3)
            assert group.attrs["num_source_samples"] == n_source and len(group["indices"]) == n
            assert np.array_equal(group["indices"][()], draw_subset(n_source, 0.5, 3, 5, split))
            assert len(group["data"]) == n  # image references
            labels = group["labels"]
            offsets = labels["roi_offsets"][()]
            assert len(offsets) == n + 1 and offsets[0] == 0
            rois = int(offsets[-1])
            assert labels["logits"].shape == (rois, 3, 32, 24) and labels["logits"].dtype == np.float16
            assert labels["bg_fg_logits"].shape == (rois, 2, 32, 24)
            assert labels["target_logits"].shape == (rois, 2, 32, 24)
            assert labels["boxes"].shape == (rois, 4)


def test_same_seed_same_cache_other_seed_other_subset(teacher, cache_file):
    tmp, ckpt = teacher
    again = tmp / "caches" / "again.hdf5"
    assert generate(tmp, ckpt, again, "--subset_fraction", "0.5", "--max_samples", "3", "--seed", "5") == 0
    other = tmp / "caches" / "other_seed.hdf5"
    assert generate(tmp, ckpt, other, "--subset_fraction", "0.5", "--max_samples", "3", "--seed", "6") == 0
    same, different = h5_contents(cache_file), h5_contents(again)
    assert {"/train/indices", "/val/indices", "/train/labels/logits", "/val/labels/boxes"} <= set(same)
    assert same.keys() == different.keys()
    for name in same:  # every group and dataset of both splits, with its attributes
        assert same[name] == different[name], name
    with h5py.File(cache_file) as a, h5py.File(other) as c:
        assert not np.array_equal(a["train/indices"][()], c["train/indices"][()])


def h5_contents(path: Path) -> dict[str, tuple]:
    """Every object of an HDF5 file by name ("/" = the file): (kind, attributes, dtype, shape, data bytes)."""

    def attrs(obj) -> dict[str, object]:
        return {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}

    out: dict[str, tuple] = {}
    with h5py.File(path, "r") as f:
        out["/"] = ("file", attrs(f))

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                raw = data.tobytes() if data.dtype != object else repr(data.tolist()).encode()
                out[f"/{name}"] = ("dataset", attrs(obj), str(obj.dtype), obj.shape, raw)
            else:
                out[f"/{name}"] = ("group", attrs(obj))

        f.visititems(visit)
    return out


def test_replayed_flip_equals_the_teacher_on_the_flipped_input(teacher, cache_file):
    tmp, ckpt = teacher
    cfg = resolve_config("quickstart_distill", tiny_set(tmp, "data.augment.hflip_prob=1.0"))
    from kdlab.data.loaders import build_datasets

    train, _ = build_datasets(cfg)
    info = CacheInfo(cache_file)
    ds = CachedPeopleDataset(train, cache_file, "train", info.splits["train"]["indices"], info.heads, None)
    flipped = CachedPeopleDataset(
        train, cache_file, "train", info.splits["train"]["indices"], info.heads, cfg.data.augment.model_copy(
            update={"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
        ),
    )  # fmt: skip
    live = load_cache_teacher(ckpt, SegmentationCacheWriter(), teacher_loader(cfg), torch.device("cpu"))
    checked = 0
    for position in range(len(ds)):
        plain, mirrored = ds[position], flipped[position]
        assert torch.equal(mirrored["image"], plain["image"].flip(-1))
        if plain["boxes"].shape[0] == 0:
            continue
        rois = torch.cat([torch.zeros(len(mirrored["boxes"]), 1), mirrored["boxes"]], dim=1)
        expected = teacher_roi_outputs(live, mirrored["image"][None].float() / 255, rois, symmetrize=True)
        for head in info.heads:
            got = mirrored[f"teacher_{head}"].float()
            assert torch.allclose(got, expected[head], atol=2e-3, rtol=2e-3), head  # float16 storage
            assert torch.equal(got, plain[f"teacher_{head}"].float().flip(-1))
        checked += 1
    assert checked > 0


def test_student_trains_from_the_cache_alone(teacher, cache_file, tmp_path, caplog):
    """The acceptance at tiny size: no teacher file anywhere, the cache is all the student has."""
    tmp, _ = teacher
    cache = tmp_path / "moved.hdf5"
    cache.write_bytes(cache_file.read_bytes())
    args = tiny_args(tmp_path, "distillation.grad_share_every=1", f"distillation.cache.distillation_data_path={cache}",
                     f"data.synthetic.root={tmp / 'data'}", epochs=1, config="quickstart_distill")  # fmt: skip
    assert not (tmp_path / "runs" / "quickstart_teacher").exists()  # the teacher_experiment run is not there
    assert run_cli(train_main, args) == 0
    run = tmp_path / "runs" / "quickstart_distill"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_cache"]["samples"] == {"train": 3, "val": 2}
    assert summary["train_images"] == 3 and not summary.get("teacher_metrics")
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0]
    for term in ("train_distill_final", "train_distill_bg_fg", "train_distill_target", "train_base_total"):
        assert term in header
    assert "reusing the existing teacher cache" in caplog.text
    assert "horizontal flips are replayed" in caplog.text


def test_a_missing_cache_is_generated_from_the_teacher_then_reused(teacher, tmp_path, caplog):
    tmp, ckpt = teacher
    cache = tmp_path / "made_by_training.hdf5"
    common = [f"distillation.cache.distillation_data_path={cache}", f"distillation.cache.teacher_model_path={ckpt}",
              "distillation.cache.max_samples=2", f"data.synthetic.root={tmp / 'data'}"]  # fmt: skip
    assert run_cli(train_main, tiny_args(tmp_path, *common, epochs=1, config="quickstart_distill")) == 0
    assert CacheInfo(cache).splits["train"]["indices"].shape == (2,)
    assert "does not exist yet: it will be generated" in caplog.text
    before = cache.stat().st_mtime_ns
    args = tiny_args(tmp_path, *common, "name=second", epochs=1, config="quickstart_distill")
    assert run_cli(train_main, args) == 0
    assert cache.stat().st_mtime_ns == before  # reused, not regenerated


def run_train(args: list[str], capsys) -> tuple[int, str]:
    """train_advanced.py in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = run_cli(train_main, args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.min_box_size=3"], "made with data.min_box_size=8.0 but the config has 3.0"),
        (["model.mask_size=16,12"], "model.mask_size"),
        (["data.synthetic.seed=7"], "made from other train data"),
        (["distillation.teacher_experiment=null", "distillation.cache.distillation_data_path=__missing__"], "does not exist and no teacher"),
        (["distillation.cache.distillation_data_path=__missing__"], "(to generate the teacher cache"),
    ],
)  # fmt: skip
def test_a_cache_that_does_not_match_is_refused_before_anything_is_written(
    teacher, cache_file, tmp_path, capsys, sets, message
):
    tmp, _ = teacher
    sets = [s.replace("__missing__", str(tmp_path / "nope.hdf5")) for s in sets]
    args = tiny_args(tmp_path, f"distillation.cache.distillation_data_path={cache_file}",
                     f"data.synthetic.root={tmp / 'data'}", *sets, epochs=1, config="quickstart_distill")  # fmt: skip
    before = tree_hashes(cache_file.parent)
    code, err = run_train(args, capsys)
    assert code == 2, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()
    assert tree_hashes(cache_file.parent) == before


def test_generate_refuses_bad_input_with_one_line(teacher, cache_file, tmp_path, capsys):
    tmp, ckpt = teacher
    before = cache_file.read_bytes()
    assert generate(tmp, ckpt, cache_file) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err and cache_file.read_bytes() == before
    assert generate(tmp, ckpt, tmp_path / "e.hdf5", "--subset_fraction", "0.1") == 2  # 4 val images -> 0
    assert "train split would be empty" in capsys.readouterr().err
    assert generate(tmp, ckpt, tmp_path / "e.hdf5", "--max_samples", "0") == 2
    assert "--max_samples must be > 0" in capsys.readouterr().err
    assert generate(tmp, tmp_path / "no_teacher.pth", tmp_path / "e.hdf5") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "e.hdf5").exists() and not list(tmp_path.glob(".e.hdf5*"))
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        CacheInfo(junk)


def test_onnx_teacher_round_trip_matches_the_pth_cache(teacher, tmp_path):
    tmp, ckpt = teacher
    onnx_path = tmp_path / "teacher.onnx"
    assert run_cli(cache_main, ["export-teacher", "--teacher", str(ckpt), "--out", str(onnx_path)]) == 0
    from_pth, from_onnx = tmp_path / "pth.hdf5", tmp_path / "onnx.hdf5"
    assert generate(tmp, ckpt, from_pth) == 0
    assert generate(tmp, onnx_path, from_onnx) == 0
    with h5py.File(from_pth) as a, h5py.File(from_onnx) as b:
        assert b.attrs["teacher_kind"] == "onnx" and json.loads(b.attrs["heads"]) == json.loads(
            a.attrs["heads"]
        )
        for split in ("train", "val"):
            for head in ("logits", "bg_fg_logits", "target_logits"):
                x = a[f"{split}/labels/{head}"][()].astype(np.float64)
                y = b[f"{split}/labels/{head}"][()].astype(np.float64)
                assert x.shape == y.shape and x.size > 0
                # within 1e-3, allowing one float16 storage step (2^-10 relative) where both round apart
                assert np.all(np.abs(x - y) <= 1e-3 + 1e-3 * np.abs(x)), (split, head, np.abs(x - y).max())


def test_a_masks_only_onnx_cache_refuses_aux_kd_weights(teacher, tmp_path, capsys):
    tmp, ckpt = teacher
    from kdlab.export.graph import CONFIG_METADATA_KEY
    from kdlab.export.segmentation import export_model_to_onnx
    from kdlab.tasks import model_from_checkpoint

    model, cfg, _ = model_from_checkpoint(ckpt, "teacher")
    onnx_path = tmp_path / "masks_only.onnx"
    export_model_to_onnx(
        model, onnx_path, (64, 64), metadata={CONFIG_METADATA_KEY: json.dumps(cfg.model_dump(mode="json"))}
    )
    cache = tmp_path / "masks_only.hdf5"
    assert generate(tmp, onnx_path, cache) == 0
    assert CacheInfo(cache).heads == ["logits"]
    args = tiny_args(tmp_path, f"distillation.cache.distillation_data_path={cache}", f"data.synthetic.root={tmp / 'data'}",
                     epochs=1, config="quickstart_distill")  # fmt: skip
    code, err = run_train(args, capsys)
    assert code == 2 and "has no bg_fg_logits outputs" in error_lines(err)[0]
    code, err = run_train(args + ["distillation.bg_fg_weight=0", "distillation.target_weight=0"], capsys)
    assert code == 0, err[-2000:]


def test_request_defaults_come_from_the_config_block():
    from kdlab.distill.cache import request_from_config

    cfg = resolve_config(
        "quickstart_distill", ["distillation.cache.max_samples=9", "distillation.cache.seed=4"]
    )
    req = request_from_config(cfg, "t.pth", Path("c.hdf5"))
    assert req == CacheRequest("t.pth", Path("c.hdf5"), 1.0, 9, 32, 4, True)
