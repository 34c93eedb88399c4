"""Image-classification data: scikit-learn's embedded digits or an ImageFolder tree, split deterministically.

Both sources become uint8 tensors [N,3,S,S] held in memory (S = `data.classification.image_size`) plus int64
labels; every image is decoded when the dataset is built, so a missing directory, an empty class set or an
unreadable/truncated file fails with one DataError line before any run directory exists.

Batches are dicts like the segmentation ones: `images` uint8 [B,3,S,S] (made float in [0,1] on the
device), `labels` int64 [B], `indices`. Augmentation (random translation, brightness) is drawn from a
per-sample generator seeded by `EpochSeededSampler`, so a resumed run sees the same augmentations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdlab.config.schema import ClassificationDataConfig, ExperimentConfig
from kdlab.data.loaders import build_loader, readable_samples
from kdlab.data.seeds import knuth_index_seed
from kdlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Decoded images (uint8 [N,3,S,S]), labels (int64 [N]) and the class names (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def subset(self, indices: np.ndarray | list[int]) -> ImageSet:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


# ------------------------------------------------------------------------------------------- sources
def load_digits_images(image_size: int) -> ImageSet:
    """sklearn's 1,797 handwritten 8x8 digits (values 0..16), upsampled bilinearly to image_size, 3 channels."""
    from sklearn.datasets import load_digits  # lazily: only the digits source needs scikit-learn

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    images = (x * 255.0).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images, torch.from_numpy(digits.target.astype(np.int64)), [str(c) for c in range(10)])


def _class_dirs(root: Path, what: str) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{what} directory {root} does not exist")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(
            f"{what} directory {root} has no class subdirectories (expected {root}/<class>/*.png)"
        )
    return dirs


def decode_image(path: Path, image_size: int) -> torch.Tensor:
    """One image file as uint8 [3,S,S] (RGB, resized); an unreadable or truncated file raises DataError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: truncated files fail here, not later in training
            rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except Exception as exc:
        raise DataError(f"image file {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image_folder(root: str | Path, image_size: int, what: str = "data.classification.root") -> ImageSet:
    """`root/<class>/<image>` -> ImageSet; classes sorted by directory name; every image decoded now."""
    root = Path(root)
    class_dirs = _class_dirs(root, what)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class directory {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for file in files:
            images.append(decode_image(file, image_size))
            labels.append(label)
    return ImageSet(
        torch.stack(images), torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs]
    )


# ------------------------------------------------------------------------------------------- splits
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded permutation; round(n * val_fraction) to val
    (at least one per class with two or more samples). Returns sorted (train_indices, val_indices)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices with the class proportions of `labels` (deterministic in `seed`), sorted."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, size / len(labels), seed)
    return keep


# The test split's own random stream (with split_seed): drawing it never moves the train/val permutation.
TEST_SPLIT_STREAM = 0x7E57


def split_off_test(
    train_labels: np.ndarray, class_totals: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified test indices taken out of the training part: per class round(class_total * test_fraction)
    (at least one, and never the class's last training sample), by a seeded permutation of its own stream.
    Returns sorted (train_indices, test_indices) into `train_labels`.

    Taken after the train/val split, from the training part only, so the validation split is identical with
    or without a test split, and test_fraction=0 leaves today's train split byte for byte."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, TEST_SPLIT_STREAM])
    keep: list[int] = []
    test: list[int] = []
    for cls in np.unique(train_labels):
        idx = np.flatnonzero(train_labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(float(class_totals[cls]) * test_fraction))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.extend(idx[:n_test].tolist())
        keep.extend(idx[n_test:].tolist())
    return np.array(sorted(keep), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def _with_test_split(cfg: ClassificationDataConfig, train: ImageSet, val: ImageSet) -> dict[str, ImageSet]:
    """{"train", "val"} plus, with test_fraction > 0, a "test" split taken out of train (see split_off_test)."""
    if cfg.test_fraction == 0:
        return {"train": train, "val": val}
    labels = train.labels.numpy()
    totals = np.bincount(np.concatenate([labels, val.labels.numpy()]), minlength=len(train.classes))
    keep, test = split_off_test(labels, totals, cfg.test_fraction, cfg.split_seed)
    return {"train": train.subset(keep), "val": val, "test": train.subset(test)}


def _folder_splits(cfg: ClassificationDataConfig, root: Path) -> dict[str, ImageSet]:
    """An image folder's splits: `train/` + `val/` (+ `test/`) as given, or one tree split here."""
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        full = read_image_folder(root, cfg.image_size)
        train_idx, val_idx = stratified_split(full.labels.numpy(), cfg.val_fraction, cfg.split_seed)
        return _with_test_split(cfg, full.subset(train_idx), full.subset(val_idx))
    splits = {
        "train": read_image_folder(root / "train", cfg.image_size, "data.classification.root train"),
        "val": read_image_folder(root / "val", cfg.image_size, "data.classification.root val"),
    }
    if (root / "test").is_dir():
        if cfg.test_fraction > 0:
            raise ConfigError(
                f"data.classification.test_fraction={cfg.test_fraction} but {root}/test holds a test split; set "
                "data.classification.test_fraction=0 to use it, or remove it to split one off"
            )
        splits["test"] = read_image_folder(root / "test", cfg.image_size, "data.classification.root test")
    for name, part in splits.items():
        if part.classes != splits["train"].classes:
            raise DataError(
                f"{root}/train and {root}/{name} have different class directories: "
                f"{splits['train'].classes} vs {part.classes}"
            )
    if "test" in splits:
        return splits
    return _with_test_split(cfg, splits["train"], splits["val"])


def load_image_splits(cfg: ClassificationDataConfig) -> dict[str, ImageSet]:
    """{"train", "val"} and, when configured, "test" for the configured source; raises ConfigError/DataError
    with one line on bad input."""
    if cfg.source == "digits":
        full = load_digits_images(cfg.image_size)
        train_idx, val_idx = stratified_split(full.labels.numpy(), cfg.val_fraction, cfg.split_seed)
        splits = _with_test_split(cfg, full.subset(train_idx), full.subset(val_idx))
    else:
        if not cfg.root:
            raise ConfigError("data.classification.source=image_folder needs data.classification.root")
        splits = _folder_splits(cfg, Path(cfg.root))
    if cfg.max_train_samples is not None:
        train = splits["train"]
        splits["train"] = train.subset(
            stratified_subset(train.labels.numpy(), cfg.max_train_samples, cfg.split_seed + 1)
        )
    for name, part in splits.items():
        if len(part.labels) == 0:
            shown = {"val": "validation"}.get(name, name)
            raise DataError(
                f"the {shown} split of data.classification ({cfg.source}) is empty; add images or change "
                f"data.classification.{'test' if name == 'test' else 'val'}_fraction"
            )
    return splits


def load_image_sets(cfg: ClassificationDataConfig) -> tuple[ImageSet, ImageSet]:
    """(train, val) for the configured source (see `load_image_splits`, which also gives the test split)."""
    splits = load_image_splits(cfg)
    return splits["train"], splits["val"]


# ------------------------------------------------------------------------------------------- dataset
class ClassificationDataset(Dataset):
    """Items by int or `(index, seed)`: {"image": uint8 [3,S,S], "label": int, "index": int}."""

    def __init__(
        self, images: ImageSet, augment: bool, random_shift: int = 0, brightness: float = 0.0
    ) -> None:
        self.images = images.images
        self.labels = images.labels
        self.classes = images.classes
        self.augment = augment
        self.random_shift = random_shift
        self.brightness = brightness

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, knuth_index_seed(item))
        image = self.images[index]
        if self.augment:
            image = augment_image(
                image, torch.Generator().manual_seed(seed), self.random_shift, self.brightness
            )
        return {"image": image, "label": int(self.labels[index]), "index": int(index)}


def augment_image(image: torch.Tensor, gen: torch.Generator, shift: int, brightness: float) -> torch.Tensor:
    """Random translation by up to `shift` px (zero fill) and brightness factor in [1-b, 1+b]; uint8 in/out."""
    out = image
    if shift > 0:
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        padded = F.pad(image, (shift, shift, shift, shift))
        h, w = image.shape[-2:]
        out = padded[:, shift + dy : shift + dy + h, shift + dx : shift + dx + w]
    if brightness > 0:
        factor = 1.0 + (torch.rand((), generator=gen).item() * 2 - 1) * brightness
        out = (out.float() * factor).clamp_(0, 255).to(torch.uint8)
    return out.contiguous()


def collate_classification(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    error, samples = readable_samples(samples)
    if error is not None or not samples:
        return error
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "indices": [s["index"] for s in samples],
    }


def build_classification_datasets(
    cfg: ExperimentConfig,
) -> tuple[ClassificationDataset, ClassificationDataset]:
    """Train (augmented) and validation datasets; checks the class count against model.num_classes."""
    data = cfg.data.classification
    train, val = load_image_sets(data)
    if len(train.classes) != cfg.model.num_classes:
        raise ConfigError(
            f"config value model.num_classes={cfg.model.num_classes} does not match the data's "
            f"{len(train.classes)} classes; set model.num_classes={len(train.classes)}"
        )
    log.info(
        "data (%s): %d train, %d val images of %dx%d, %d classes",
        data.source, len(train.labels), len(val.labels), data.image_size, data.image_size, len(train.classes),
    )  # fmt: skip
    return (
        ClassificationDataset(
            train, augment=True, random_shift=data.random_shift, brightness=data.brightness
        ),
        ClassificationDataset(val, augment=False),
    )


def build_classification_test_dataset(cfg: ExperimentConfig) -> ClassificationDataset | None:
    """The held-out test split (data.classification.test_fraction > 0, or an image folder's `test/`), not
    augmented, in index order; None when there is none. The images are loaded again, as for
    `build_classification_datasets` (the split is deterministic, so both see the same partition)."""
    data = cfg.data.classification
    if data.source == "digits" and data.test_fraction == 0:
        return None  # nothing to load
    test = load_image_splits(data).get("test")
    if test is None:
        return None
    log.info("data (%s): %d test images", data.source, len(test.labels))
    return ClassificationDataset(test, augment=False)


def build_classification_loader(*args: Any, **kwargs: Any) -> DataLoader:
    """The shared loader (`kdlab.data.loaders.build_loader`) with the classification collate."""
    return build_loader(*args, collate_fn=collate_classification, **kwargs)
