"""The bad-input battery: every case gives exactly one `error:` line on stderr, no traceback, exit 2, and
leaves an existing run directory byte-for-byte unchanged.

Most cases even pass `--overwrite` for the existing run, so they also prove that every check happens
before an existing run is replaced.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config
from kdlab.data.synthetic import ensure_synthetic_dataset
from kdlab.models.builders import build_model
from tests.helpers import error_lines, tiny_args, tree_hashes

EXISTING = "quickstart_baseline"


class _NotWeightsOnly:
    """A class instance in a checkpoint: loading it needs unpickling arbitrary code."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A workspace with an existing (fake but complete-looking) run, a synthetic dataset and checkpoints."""
    tmp = tmp_path_factory.mktemp("battery")
    run = tmp / "runs" / EXISTING
    (run / "checkpoints").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "config.json").write_text('{"name": "quickstart_baseline"}\n')
    (run / "summary.json").write_text('{"status": "completed"}\n')
    (run / "logs" / "metrics.csv").write_text("epoch,train_loss\n1,2.0\n")
    (run / "checkpoints" / "last.pth").write_bytes(b"precious weights")

    data = tmp / "data"
    ensure_synthetic_dataset(data / "train", 4, 0, (64, 64), max_people=3)
    coco = json.loads((data / "train" / "annotations.json").read_text())

    def write_coco(name: str, mutate: Callable[[dict], None]) -> Path:
        doc = json.loads(json.dumps(coco))
        mutate(doc)
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path

    files: dict[str, Path] = {}
    files["invalid_json"] = tmp / "invalid.json"
    files["invalid_json"].write_text('{"images": [')
    files["no_person"] = write_coco("no_person", lambda d: d["categories"][0].update(name="dog"))
    files["empty"] = write_coco("empty", lambda d: d.update(annotations=[]))
    poly = [a for a in coco["annotations"] if isinstance(a["segmentation"], list)][0]["id"]

    def short_polygon(d):
        for a in d["annotations"]:
            if a["id"] == poly:
                a["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]

    files["short_polygon"] = write_coco("short_polygon", short_polygon)
    files["box_outside"] = write_coco(
        "box_outside", lambda d: d["annotations"][0].update(bbox=[100.0, 100.0, 20.0, 20.0])
    )
    files["missing_image"] = write_coco(
        "missing_image", lambda d: d["images"][0].update(file_name="not_there.png")
    )
    trunc_dir = tmp / "trunc_images"
    shutil.copytree(data / "train" / "images", trunc_dir)
    for img in trunc_dir.iterdir():
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) // 3])
    files["trunc_dir"] = trunc_dir

    cfg = resolve_config("quickstart_baseline", [], {})
    model = build_model(cfg.model.model_copy(update={"encoder": "timm-efficientnet-b0", "head_channels": 8}))
    good = {"model_state_dict": model.state_dict(), "config": cfg.model_dump(mode="json")}
    files["good_ckpt"] = tmp / "good.pth"
    torch.save(good, files["good_ckpt"])  # config says head 64, weights are head 8: wrong architecture
    files["random_bytes"] = tmp / "random.pth"
    files["random_bytes"].write_bytes(bytes(range(256)) * 64)
    files["truncated_ckpt"] = tmp / "truncated.pth"
    raw = files["good_ckpt"].read_bytes()
    files["truncated_ckpt"].write_bytes(raw[: len(raw) // 2])
    files["pickle"] = tmp / "pickle.pth"
    torch.save({"model_state_dict": {}, "config": {}, "extra": _NotWeightsOnly()}, files["pickle"])
    files["weights_only_resume"] = tmp / "best_model.pth"
    torch.save({"model_state_dict": model.state_dict(), "config": cfg.model_dump(mode="json")},
               files["weights_only_resume"])  # fmt: skip
    files["mismatched_resume"] = tmp / "mismatched_last.pth"
    torch.save(
        {**good, "optimizer_state_dict": {"state": {}, "param_groups": []}}, files["mismatched_resume"]
    )
    files["a_file"] = tmp / "a_file.txt"
    files["a_file"].write_text("not a directory")
    files["syntax_config"] = tmp / "broken_config.py"
    files["syntax_config"].write_text("CONFIG = {'name': 'x',\n")
    files["data"] = data
    return tmp, run, files


def _base(tmp: Path, *extra: str) -> list[str]:
    """Tiny args for the existing run's name, with --overwrite: only a bad input may stop it."""
    return [*tiny_args(tmp, *extra, epochs=1), "--overwrite"]


def _with(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _coco(files, key, split="train"):
    return (
        f"data.{split}_annotations={files[key]}",
        f"data.{split}_images={files['data'] / 'train' / 'images'}",
    )


# (id, argv builder(tmp, files), words the error line must contain)
CASES: list[tuple[str, Callable[[Path, dict], list[str]], list[str]]] = [
    # --- configs and CLI
    ("unknown key", lambda t, f: _base(t, "training.lrr=0.1"), ["training.lrr", "training.lr"]),
    ("unknown section", lambda t, f: _base(t, "trainng.lr=0.1"), ["trainng"]),
    ("wrong type", lambda t, f: _base(t, "training.lr=abc"), ["training.lr"]),
    ("alpha above 1", lambda t, f: [*_base(t), "--distillation_alpha", "1.5"], ["distillation.alpha"]),
    ("alpha below 0", lambda t, f: _base(t, "distillation.alpha=-0.1"), ["distillation.alpha"]),
    ("temperature 0", lambda t, f: [*_base(t), "--distillation_temperature", "0"], ["temperature"]),
    ("temperature negative", lambda t, f: _base(t, "distillation.temperature=-2"), ["temperature"]),
    ("epochs 0", lambda t, f: _with(_base(t), "--epochs", "0"), ["training.epochs"]),
    ("epochs negative", lambda t, f: _with(_base(t), "--epochs", "-3"), ["training.epochs"]),
    ("batch size 0", lambda t, f: _with(_base(t), "--batch_size", "0"), ["training.batch_size"]),
    ("lr 0", lambda t, f: _base(t, "training.lr=0"), ["training.lr"]),
    ("grad accumulation 0", lambda t, f: _base(t, "training.grad_accum_steps=0"), ["grad_accum_steps"]),
    ("workers negative", lambda t, f: _base(t, "data.num_workers=-1"), ["data.num_workers"]),
    ("unknown encoder", lambda t, f: _base(t, "model.encoder=timm-efficientnet-b99"), ["model.encoder"]),
    ("roi size 0", lambda t, f: _base(t, "model.roi_size=0,12"), ["model.roi_size"]),
    ("mask size negative", lambda t, f: _base(t, "model.mask_size=-32,24"), ["model.mask_size"]),
    ("input size 0", lambda t, f: _base(t, "data.input_size=0,64"), ["data.input_size"]),
    ("checkpoint interval 0", lambda t, f: _base(t, "training.checkpoint_every_steps=0"), ["checkpoint_every"]),
    ("--set without =", lambda t, f: _base(t, "training.lr"), ["key=value"]),
    ("unknown config name", lambda t, f: _with(_base(t), "--config", "quickstart_basline"), ["quickstart_basline"]),
    ("config file missing", lambda t, f: _with(_base(t), "--config", str(t / "nope.py")), ["does not exist"]),
    ("config file broken", lambda t, f: _with(_base(t), "--config", str(f["syntax_config"])), ["broken_config"]),
    ("unknown flag", lambda t, f: [*_base(t), "--epocs", "3"], ["--epocs"]),
    ("bad device", lambda t, f: [*_base(t), "--device", "tpu"], ["tpu"]),
    ("no config", lambda t, f: ["--epochs", "1"], ["--config is required"]),
    # --- checkpoints
    ("teacher missing", lambda t, f: [*_base(t), "--teacher_checkpoint", str(t / "nope.pth")], ["does not exist"]),
    ("teacher random bytes", lambda t, f: [*_base(t), "--teacher_checkpoint", str(f["random_bytes"])],
     ["not a PyTorch checkpoint"]),
    ("teacher truncated", lambda t, f: [*_base(t), "--teacher_checkpoint", str(f["truncated_ckpt"])],
     ["truncated"]),
    ("teacher not weights-only", lambda t, f: [*_base(t), "--teacher_checkpoint", str(f["pickle"])],
     ["weights_only"]),
    ("teacher wrong architecture", lambda t, f: [*_base(t), "--teacher_checkpoint", str(f["good_ckpt"])],
     ["does not match"]),
    ("resume missing", lambda t, f: [*tiny_args(t, epochs=1), "--resume", str(t / "nope.pth")], ["does not exist"]),
    ("resume random bytes", lambda t, f: [*tiny_args(t, epochs=1), "--resume", str(f["random_bytes"])],
     ["not a PyTorch checkpoint"]),
    ("resume weights-only file", lambda t, f: [*tiny_args(t, epochs=1), "--resume", str(f["weights_only_resume"])],
     ["last.pth"]),
    ("resume wrong architecture", lambda t, f: [*tiny_args(t, epochs=1), "--resume", str(f["mismatched_resume"])],
     ["does not match"]),
    # --- data
    ("annotations missing", lambda t, f: _base(t, f"data.train_annotations={t / 'nope.json'}"), ["nope.json"]),
    ("annotations invalid JSON", lambda t, f: _base(t, *_coco(f, "invalid_json")), ["not valid JSON"]),
    ("no person category", lambda t, f: _base(t, *_coco(f, "no_person")), ["no_person.json", "'person' category"]),
    ("empty after filtering", lambda t, f: _base(t, *_coco(f, "empty")),
     ["empty.json", "no usable images", "'person' annotations"]),
    ("polygon under 3 points", lambda t, f: _base(t, *_coco(f, "short_polygon")), ["polygon"]),
    ("box outside the image", lambda t, f: _base(t, *_coco(f, "box_outside")), ["bbox"]),
    ("image missing", lambda t, f: _base(t, *_coco(f, "missing_image")), ["not_there.png"]),
    ("images dir missing", lambda t, f: _base(t, f"data.train_images={t / 'no_dir'}"), ["no_dir"]),
    ("val annotations broken", lambda t, f: _base(t, *_coco(f, "invalid_json", "val")), ["val_annotations"]),
    # --- output directory
    ("existing run", lambda t, f: tiny_args(t, epochs=1), ["already exists", "--resume"]),
    ("output dir under a file", lambda t, f: _with(_base(t), "--output_dir", str(f["a_file"] / "runs")),
     ["output_dir"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line_exit_2_and_touches_nothing(env, case, capsys):
    tmp, run, files = env
    _, build, words = case
    before = tree_hashes(tmp / "runs")
    code = run_cli(train_main, build(tmp, files))
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert code == 2, err[-3000:]
    assert len(errors) == 1, errors
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]
    assert tree_hashes(tmp / "runs") == before
    assert not (files["a_file"].parent / "a_file.txt" / "runs").exists()


def test_truncated_image_found_mid_run_leaves_other_runs_untouched(env, capsys):
    """Decoding is lazy, so a truncated image stops the run that reads it (exit 2, one line); an existing
    run beside it is untouched."""
    tmp, run, files = env
    before = tree_hashes(run)
    coco = files["data"] / "train" / "annotations.json"
    args = tiny_args(tmp, f"data.train_annotations={coco}", f"data.train_images={files['trunc_dir']}",
                     "name=truncated_images", epochs=1)  # fmt: skip
    assert run_cli(train_main, args) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "could not be decoded" in errors[0]
    assert tree_hashes(run) == before
