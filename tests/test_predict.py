"""kdlab-predict: ONNX and .pth agree, COCO results load into COCOeval, every box source works, masks come
back at each image's own resolution, metrics are the trainer's, and each bad input is one error line with
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kdlab.cli.common import run_cli
from kdlab.cli.predict import main as predict_main
from kdlab.data.roi_masks import build_roi_masks, paste_roi_probabilities
from kdlab.experiments.export_runs import export_run_to_onnx
from tests.helpers import copy_teacher_workspace, error_lines


@pytest.fixture(scope="module")
def ws(trained_teacher_root: Path, tmp_path_factory) -> dict[str, Path]:
    """The session teacher copied (read-only original), exported to ONNX, and its tiny validation set."""
    dest, ckpt = copy_teacher_workspace(trained_teacher_root, tmp_path_factory.mktemp("predict"))
    export_run_to_onnx(ckpt.parent.parent, parity_images=1)
    val = next((trained_teacher_root / "data").glob("val_*"))
    return {
        "root": dest, "pth": ckpt, "onnx": ckpt.with_suffix(".onnx"),
        "ann": val / "annotations.json", "images": val / "images",
    }  # fmt: skip


def predict(args: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(predict_main, [*args, "--no_progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def coco_outputs(ws, tmp_path_factory) -> dict[str, Path]:
    """One --coco prediction per model kind (shared by the tests that read them)."""
    base = tmp_path_factory.mktemp("coco_out")
    outs = {}
    for kind in ("pth", "onnx"):
        out = base / kind
        code = run_cli(
            predict_main,
            ["--model", str(ws[kind]), "--images", str(ws["images"]), "--coco", str(ws["ann"]),
             "--output", str(out), "--batch_size", "3", "--no_progress"],
        )  # fmt: skip
        assert code == 0
        outs[kind] = out
    return outs


def _masks(results: list[dict]) -> np.ndarray:
    return np.stack([mask_utils.decode(r["segmentation"]) for r in results]).astype(bool)


def test_onnx_and_pth_give_the_same_masks(coco_outputs):
    pth = json.loads((coco_outputs["pth"] / "predictions.json").read_text())
    onnx = json.loads((coco_outputs["onnx"] / "predictions.json").read_text())
    assert len(pth) == len(onnx) > 0
    assert [r["image_id"] for r in pth] == [r["image_id"] for r in onnx]
    a, b = _masks(pth), _masks(onnx)
    assert a.any(axis=(1, 2)).mean() > 0.5  # the teacher draws people: the comparison is not of empty masks
    # Identical up to pixels where two classes are within float noise of each other.
    assert (a != b).mean() < 1e-3
    assert np.allclose([r["score"] for r in pth], [r["score"] for r in onnx], atol=1e-3)
    m_pth = json.loads((coco_outputs["pth"] / "metrics.json").read_text())["metrics"]
    m_onnx = json.loads((coco_outputs["onnx"] / "metrics.json").read_text())["metrics"]
    assert m_pth["target_iou"] == pytest.approx(m_onnx["target_iou"], abs=1e-3)


def test_predictions_load_into_cocoeval_segm(ws, coco_outputs):
    gt = COCO(str(ws["ann"]))
    results = json.loads((coco_outputs["onnx"] / "predictions.json").read_text())
    n_people = sum(1 for a in gt.dataset["annotations"] if not a.get("iscrowd", 0))
    assert len(results) == n_people  # one result per (non-crowd) person box
    assert {r["category_id"] for r in results} == {gt.getCatIds(catNms=["person"])[0]}
    dt = gt.loadRes(str(coco_outputs["onnx"] / "predictions.json"))
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert len(ev.stats) == 12 and np.isfinite(ev.stats).all()
    overlays = sorted(p.name for p in (coco_outputs["onnx"] / "overlays").iterdir())
    assert overlays == sorted(
        f"{Path(i['file_name']).stem}.png" for i in gt.dataset["images"] if gt.getAnnIds(imgIds=i["id"])
    )


def test_metrics_are_the_trainers_evaluator_on_the_same_data(ws, tmp_path, capsys):
    """metrics.json equals the task's evaluator on the run's validation set pointed at the same file, which
    holds one person smaller than the config's data.min_box_size: predicted, but not scored (as in training)."""
    from kdlab.data.loaders import build_datasets, build_loader
    from kdlab.tasks import model_from_checkpoint, task_of

    model, cfg, _ = model_from_checkpoint(ws["pth"], "checkpoint")
    coco = json.loads(ws["ann"].read_text())
    assert cfg.data.min_box_size > 4
    tiny = {"id": 10_000, "image_id": coco["images"][0]["id"], "category_id": coco["categories"][0]["id"],
            "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}  # fmt: skip
    coco["annotations"].append(tiny)
    ann = tmp_path / "with_tiny.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    code, _, err = predict(
        ["--model", str(ws["pth"]), "--images", str(ws["images"]), "--coco", str(ann), "--output", str(out)],
        capsys,
    )
    assert code == 0, err
    assert len(json.loads((out / "predictions.json").read_text())) == len(coco["annotations"])

    data = cfg.data.model_copy(update={"val_annotations": str(ann), "val_images": str(ws["images"])})
    _, val = build_datasets(cfg.model_copy(update={"data": data}))
    loader = build_loader(val, 2, shuffle=False, seed=0, num_workers=0, pin_memory=False)
    expected, _ = task_of(cfg).build_evaluator(cfg, loader, torch.device("cpu"), None, False)(model.eval())
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    assert got["num_rois"] == expected["num_rois"] == len(coco["annotations"]) - 1
    for key in ("target_iou", "miou", "iou_background", "iou_target", "iou_other", "boundary_f1"):
        if np.isnan(expected[key]):
            assert got[key] is None
        else:
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_coco_with_a_list_of_files_predicts_and_scores_those_only(ws, tmp_path, capsys):
    gt = COCO(str(ws["ann"]))
    chosen = sorted(ws["images"].iterdir())[:2]
    out = tmp_path / "out"
    args = [
        "--model",
        str(ws["onnx"]),
        "--images",
        *map(str, chosen),
        "--coco",
        str(ws["ann"]),
        "--output",
        str(out),
    ]
    code, stdout, err = predict(args, capsys)
    assert code == 0, err
    ids = {i["id"] for i in gt.dataset["images"] if i["file_name"] in {p.name for p in chosen}}
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == ids
    assert len(results) == len(gt.getAnnIds(imgIds=list(ids), iscrowd=False))
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["images"] == 2 and 0 < metrics["num_rois"] <= len(results)
    assert "target_iou" in stdout  # the table


def test_coco_file_names_with_a_subfolder_resolve_under_images_as_in_training(ws, tmp_path, capsys):
    """A standard COCO export (labelme's: `file_name` = `JPEGImages/x.jpg`) with `--images` at its root, as
    training's data.*_images takes it: every image is predicted, also two that share a base name in two
    subfolders (each gets its own overlay)."""
    coco = json.loads(ws["ann"].read_text())
    root = tmp_path / "export"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "more").mkdir()
    for image in coco["images"]:
        shutil.copy(ws["images"] / image["file_name"], root / "JPEGImages" / image["file_name"])
        image["file_name"] = f"JPEGImages/{image['file_name']}"
    first = dict(coco["images"][0], id=9_000, file_name=f"more/{Path(coco['images'][0]['file_name']).name}")
    shutil.copy(root / coco["images"][0]["file_name"], root / first["file_name"])
    coco["images"].append(first)
    coco["annotations"] += [
        dict(a, id=90_000 + k, image_id=first["id"])
        for k, a in enumerate(
            a for a in list(coco["annotations"]) if a["image_id"] == coco["images"][0]["id"]
        )
    ]
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    code, _, err = predict(
        ["--model", str(ws["pth"]), "--images", str(root), "--coco", str(ann), "--output", str(out)], capsys
    )
    assert code == 0, err
    with_people = {a["image_id"] for a in coco["annotations"]}
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == with_people and len(results) == len(coco["annotations"])
    images = json.loads((out / "images.json").read_text())["images"]
    assert {i["id"]: i["file_name"] for i in images} == {
        i["id"]: i["file_name"] for i in coco["images"] if i["id"] in with_people
    }
    assert len({i["overlay"] for i in images}) == len(images) == len(list((out / "overlays").iterdir()))
    assert json.loads((out / "metrics.json").read_text())["metrics"]["images"] == len(with_people)


def test_boxes_json_whole_image_and_an_image_of_another_size(ws, tmp_path, capsys):
    """--boxes and --whole_image; a 50x90 image (the model takes 96x96) gets masks at 50x90, the box mapped in
    and the mask pasted back so that a box over the left half yields pixels on the left half only."""
    odd = tmp_path / "imgs"
    odd.mkdir()
    src = sorted(ws["images"].iterdir())[0]
    Image.open(src).convert("RGB").resize((90, 50)).save(odd / "wide.png")
    shutil.copy(src, odd / src.name)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"wide.png": [[0, 0, 45, 50], [10, 5, 80, 45]], src.name: [[2, 2, 60, 90]]}))
    out = tmp_path / "out_boxes"
    code, stdout, err = predict(
        ["--model", str(ws["onnx"]), "--images", str(odd), "--boxes", str(boxes), "--output", str(out)],
        capsys,
    )
    assert code == 0, err
    assert "3 ROIs on 2 images" in stdout
    results = json.loads((out / "predictions.json").read_text())
    images = json.loads((out / "images.json").read_text())["images"]
    ids = {i["file_name"]: i["id"] for i in images}
    assert sorted(ids.values()) == [0, 1] and ids[src.name] == 0  # index in sorted file order
    wide = [r for r in results if r["image_id"] == ids["wide.png"]]
    assert [r["segmentation"]["size"] for r in wide] == [[50, 90], [50, 90]]
    left = mask_utils.decode(wide[0]["segmentation"])
    assert not left[:, 46:].any()  # nothing outside the ROI's window (no margin)
    assert Image.open(out / "overlays" / "wide.png").width >= 90

    out = tmp_path / "out_whole"
    code, stdout, err = predict(
        ["--model", str(ws["pth"]), "--images", str(odd / "wide.png"), "--whole_image", "--output", str(out)],
        capsys,
    )
    assert code == 0, err
    (result,) = json.loads((out / "predictions.json").read_text())
    assert result["roi_box"] == [0.0, 0.0, 90.0, 50.0] and result["segmentation"]["size"] == [50, 90]


def test_paste_inverts_the_roi_target_crop():
    """A person mask cropped to its ROI window as the targets are (margin 0.25), then pasted back, is the
    person again at full resolution (up to the ROI grid's resolution at the boundary)."""
    h, w = 60, 80
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    person = ((yy - 30) ** 2 / 20**2 + (xx - 35) ** 2 / 12**2) <= 1
    box = torch.tensor([[23.0, 10.0, 48.0, 51.0]])
    roi = build_roi_masks(person[None], box, (40, 30), margin=0.25)[0]
    probs = torch.nn.functional.one_hot(roi.long(), 3).permute(2, 0, 1).float()
    window = torch.tensor([23 - 6.25, 10 - 10.25, 48 + 6.25, 51 + 10.25])
    (x0, y0, x1, y1), region = paste_roi_probabilities(probs, window, (h, w))
    assert (x0, y0, x1, y1) == (17, 0, 54, 60)  # pixel centres inside the window, clipped to the image
    pasted = torch.zeros(h, w, dtype=torch.bool)
    pasted[y0:y1, x0:x1] = region.argmax(0) == 1
    iou = (pasted & person).sum() / (pasted | person).sum()
    assert iou > 0.9


def test_a_roi_window_with_margin_comes_back_at_the_grown_box_in_original_pixels():
    """All-target logits over a margin-0.25 window: the pasted own mask is the box grown by the margin, at
    the original 50x90 resolution, through the letterbox into a 64x64 input and back."""
    from kdlab.data.transforms import crop_boxes, letterbox_window
    from kdlab.predict.run import image_rois

    window = letterbox_window((50, 90), (64, 64))
    box = torch.tensor([[30.2, 10.2, 60.0, 44.0]])
    logits = torch.full((1, 3, 8, 6), -30.0)
    logits[:, 1] = 0.0
    (roi,) = image_rois(logits, crop_boxes(box, window, (64, 64)), window, margin=0.25)
    assert roi.own.shape == (50, 90) and roi.score == pytest.approx(1.0)
    ys, xs = np.nonzero(roi.own)
    # grown: x 22.75..67.45, y 1.75..52.45 -> pixel centres inside: columns 23..66, rows 2..49 (clipped)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (23, 66, 2, 49)
    assert roi.own.sum() == 44 * 48  # the whole grown box, nothing else
    assert not roi.other.any()


# ------------------------------------------------------------------------------------------ bad input
def _classification_checkpoint(path: Path) -> Path:
    from kdlab.config.loader import resolve_config
    from kdlab.tasks import build_model

    cfg = resolve_config("digits_teacher", [], {})
    torch.save(
        {"model_state_dict": build_model(cfg).state_dict(), "config": cfg.model_dump(mode="json")}, path
    )
    return path


def _truncated_copy(images: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in sorted(images.iterdir()):
        shutil.copy(p, dest / p.name)
    victim = sorted(dest.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    return dest


BAD_INPUTS = {
    "missing model": (lambda ws, t: ["--model", str(t / "nope.onnx"), "--images", str(ws["images"]), "--whole_image"], "does not exist"),
    "truncated image": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(_truncated_copy(ws["images"], t / "trunc")), "--coco", str(ws["ann"])], "could not be decoded"),
    "box outside its image": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"]), "--boxes", _write(t / "b.json", {"000000.jpg": [[200, 200, 300, 300]]})], "lies outside"),
    "no boxes for an image": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"]), "--boxes", _write(t / "b.json", {"000000.jpg": []})], "no boxes for 000000.jpg"),
    "no boxes at all": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"]), "--boxes", _write(t / "b.json", {})], "gives no images"),
    "broken coco": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"]), "--coco", _write(t / "c.json", "{\"images\": [")], "not valid JSON"),
    "image not in the coco file": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"] / "000000.jpg"), _write(t / "x.png", ""), "--coco", str(ws["ann"])], "has no entry in coco file"),
    "coco and boxes": (lambda ws, t: ["--model", str(ws["onnx"]), "--images", str(ws["images"]), "--coco", str(ws["ann"]), "--boxes", str(ws["ann"])], "not allowed with"),
    "pth of another task": (lambda ws, t: ["--model", str(_classification_checkpoint(t / "digits.pth")), "--images", str(ws["images"]), "--whole_image"], "is a classification model"),
}  # fmt: skip


def _write(path: Path, data: object) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(ws, tmp_path, capsys, case):
    build, expected = BAD_INPUTS[case]
    out = tmp_path / "out" / "preds"
    before = sorted(tmp_path.iterdir())
    code, _, err = predict([*build(ws, tmp_path), "--output", str(out)], capsys)
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kdlab-predict")]  # no staging left
    assert {p for p in tmp_path.iterdir()} - set(before) <= {
        tmp_path / n for n in ("trunc", "b.json", "c.json", "digits.pth", "x.png")
    }
