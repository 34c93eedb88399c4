"""Datasets and DataLoaders from a config: paths (or a generated synthetic set), sampler, collate.

A batch carries every ROI of every image: `images` uint8 [B,3,H,W] (converted to float on the device),
`rois` float [N,5] = (batch_index, x1, y1, x2, y2), `masks` uint8 [N,mask_h,mask_w]. The UNet therefore runs
once per image, never once per ROI.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util  # noqa: F401  (its exit handler is registered before ours: ours runs first)
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlab.config.schema import DataConfig, ExperimentConfig
from kdlab.data.coco import CocoPeopleDataset, image_path, read_coco_people
from kdlab.data.seeds import draw_seed
from kdlab.data.teacher_cache import collate_teacher_outputs
from kdlab.data.transforms import EvalTransform, TrainTransform
from kdlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)


ERROR_KEY = "__data_error__"


class ErrorsAsValues(Dataset):
    """Returns a dataset's DataError as a value, so it reaches the main process as one clean line.

    A worker's exception is re-raised by the DataLoader with the worker traceback folded into its message;
    carrying the message as data and raising it in the main process (`raise_if_data_error`) keeps
    `error: image file ... could not be decoded` a single line.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except DataError as exc:
            return {ERROR_KEY: str(exc)}


def raise_if_data_error(batch: dict[str, Any] | None) -> None:
    if batch is not None and ERROR_KEY in batch:
        raise DataError(batch[ERROR_KEY])


def readable_samples(
    samples: list[dict[str, Any] | None],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the batch that carries the first unreadable sample's error, or None; the samples kept). Every
    collate starts here: an error travels to the main process as a value, skipped (None) samples drop."""
    for s in samples:
        if s is not None and ERROR_KEY in s:
            return {ERROR_KEY: s[ERROR_KEY]}, []
    return None, [s for s in samples if s is not None]


def collate_people(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack images, concatenate every image's ROIs with their batch index (and any cached `teacher_*` ROI
    rows in the same order); drop skipped (None) samples."""
    error, samples = readable_samples(samples)
    if error is not None or not samples:
        return error
    images = torch.stack([s["image"] for s in samples])
    rois = []
    for i, s in enumerate(samples):
        boxes = s["boxes"].to(torch.float32)
        rois.append(torch.cat([torch.full((boxes.shape[0], 1), float(i)), boxes], dim=1))
    return {
        "images": images,
        "rois": torch.cat(rois, dim=0),
        "masks": torch.cat([s["roi_masks"] for s in samples], dim=0),
        "image_ids": [s["image_id"] for s in samples],
        "indices": [s["index"] for s in samples],
        **collate_teacher_outputs(samples),  # cached teacher logits (training from a teacher cache)
    }


class EpochSeededSampler(Sampler):
    """Yields `(index, draw_seed)`; order and augmentation seeds depend only on (seed, epoch).

    That keeps data order and augmentation identical after a resume and independent of worker count.
    Under DDP (`world_size` > 1) each global batch of `world_size * batch_size` positions is cut into
    consecutive blocks, one per rank, so N processes with batch b see exactly the micro-batches of one
    process with batch b and `grad_accum_steps=N`. The epoch is padded (by repeating its start) to a
    multiple of `world_size` so every rank runs the same number of steps. `skip_batches` resumes an epoch
    after the batches already trained.
    """

    def __init__(
        self,
        length: int,
        shuffle: bool,
        seed: int,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pad_even: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.pad_even = pad_even
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _rank_positions(self) -> list[int]:
        """Positions (in the epoch's order) this rank trains on, in order."""
        world, bs = self.world_size, self.batch_size
        total = -(-self.length // world) * world
        positions = list(range(total))
        if world == 1:
            return positions
        if not self.pad_even:  # evaluation: every sample exactly once over all ranks
            return list(range(self.rank, self.length, world))
        mine: list[int] = []
        for start in range(0, total, world * bs):
            chunk = positions[start : start + world * bs]
            per_rank = len(chunk) // world
            mine.extend(chunk[self.rank * per_rank : (self.rank + 1) * per_rank])
        return mine

    def __len__(self) -> int:
        if not self.pad_even:
            return len(range(self.rank, self.length, self.world_size))
        return -(-self.length // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(draw_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF))
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        for position in self._rank_positions()[self.skip_batches * self.batch_size :]:
            # Padding positions (>= length) repeat the epoch's start with their own augmentation seed.
            yield order[position % self.length], draw_seed(self.seed, self.epoch, position)


@dataclass
class DataPaths:
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path
    test_annotations: Path | None = None  # the optional held-out test split (both or neither)
    test_images: Path | None = None


# Seed offsets of the generated splits: each split is its own stream of images (`render_synthetic_image` seeds
# one generator per (split seed, index)), so adding a test split leaves train/ and val/ byte-identical.
SYNTHETIC_VAL_SEED_OFFSET = 100_003
SYNTHETIC_TEST_SEED_OFFSET = 200_003


def check_given_data_paths(cfg: DataConfig) -> None:
    """Fail fast on dataset paths the user set that do not exist (cheap, no parsing)."""
    for key in [
        f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("annotations", "images")
    ]:
        value = getattr(cfg, key)
        if value and key.endswith("annotations") and not Path(value).is_file():
            raise DataError(f"data.{key} file {value} does not exist (set it to a COCO instances JSON)")
        if value and key.endswith("images") and not Path(value).is_dir():
            raise DataError(f"data.{key} directory {value} does not exist")


def resolve_data_paths(cfg: DataConfig, generate: bool = True) -> DataPaths:
    """The four dataset paths; missing ones come from `data.synthetic` (generated on first use)."""
    given = {
        "train_annotations": cfg.train_annotations,
        "train_images": cfg.train_images,
        "val_annotations": cfg.val_annotations,
        "val_images": cfg.val_images,
    }
    check_given_data_paths(cfg)  # before spending time generating the rest
    if cfg.synthetic is not None and not all(given.values()):
        from kdlab.data.synthetic import ensure_synthetic_dataset

        syn = cfg.synthetic
        train_dir = synthetic_split_dir(syn, "train", syn.train_images)
        val_dir = synthetic_split_dir(syn, "val", syn.val_images)
        if generate:
            ensure_synthetic_dataset(
                train_dir, syn.train_images, syn.seed, tuple(syn.image_size), max_people=syn.max_people
            )
            ensure_synthetic_dataset(
                val_dir, syn.val_images, syn.seed + SYNTHETIC_VAL_SEED_OFFSET, tuple(syn.image_size),
                max_people=syn.max_people,
            )  # fmt: skip
        given = {
            "train_annotations": given["train_annotations"] or str(train_dir / "annotations.json"),
            "train_images": given["train_images"] or str(train_dir / "images"),
            "val_annotations": given["val_annotations"] or str(val_dir / "annotations.json"),
            "val_images": given["val_images"] or str(val_dir / "images"),
        }
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ConfigError(
            f"config key data.{missing[0]} is not set; give COCO paths (data.train_annotations, data.train_images, "
            "data.val_annotations, data.val_images) or a data.synthetic block"
        )
    paths = DataPaths(**{k: Path(v) for k, v in given.items()})
    paths.test_annotations, paths.test_images = _test_paths(cfg, generate)
    return paths


def synthetic_test_dir(cfg: DataConfig) -> Path | None:
    """Where `data.synthetic` writes its test split (None: no synthetic test split configured)."""
    syn = cfg.synthetic
    if syn is None or syn.test_images == 0:
        return None
    return synthetic_split_dir(syn, "test", syn.test_images)


def synthetic_split_dir(syn: Any, split: str, count: int) -> Path:
    """<root>/<split>_<count>_<H>x<W>_seed<seed>: one directory per generated split and its parameters."""
    return Path(syn.root) / f"{split}_{count}_{syn.image_size[0]}x{syn.image_size[1]}_seed{syn.seed}"


def _test_paths(cfg: DataConfig, generate: bool) -> tuple[Path | None, Path | None]:
    """The held-out test split's (annotations, images): the given COCO pair, else the synthetic test split
    (generated on first use, from its own seed stream), else (None, None)."""
    if cfg.test_annotations and cfg.test_images:
        return Path(cfg.test_annotations), Path(cfg.test_images)
    test_dir = synthetic_test_dir(cfg)
    if test_dir is None:
        return None, None
    syn = cfg.synthetic
    assert syn is not None
    if generate:
        from kdlab.data.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(
            test_dir, syn.test_images, syn.seed + SYNTHETIC_TEST_SEED_OFFSET, tuple(syn.image_size),
            max_people=syn.max_people,
        )  # fmt: skip
    return test_dir / "annotations.json", test_dir / "images"


def check_image_files(records: list[Any], images_dir: Path, what: str) -> None:
    """Every annotated image must exist before a run starts (one stat per image; decoding stays lazy)."""
    missing = [r.file_name for r in records if not image_path(images_dir, r.file_name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"image file {image_path(images_dir, missing[0])}{more} listed in the annotations does not exist "
            f"(check data.{what}, or set data.skip_bad_images=true to skip such images)"
        )


def _dataset_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the train and validation datasets share: sizes, ROI cap, bad-image policy, the ROI window."""
    return dict(
        input_size=tuple(cfg.data.input_size),
        mask_size=tuple(cfg.model.mask_size),
        max_rois_per_image=cfg.data.max_rois_per_image,
        skip_bad_images=cfg.data.skip_bad_images,
        roi_sampling_ratio=cfg.model.roi_sampling_ratio,
        roi_margin=cfg.model.roi_margin,
    )


def validation_dataset(
    cfg: ExperimentConfig, records: list[Any], images_dir: str | Path
) -> CocoPeopleDataset:
    """The validation view of `records` (deterministic letterbox, the config's ROI targets): what the trainer
    evaluates on, also used by `kdlab-predict` to score a model on other annotated images."""
    return CocoPeopleDataset(
        records, images_dir, transform=EvalTransform(cfg.data.input_size), **_dataset_options(cfg)
    )


def build_datasets(cfg: ExperimentConfig) -> tuple[CocoPeopleDataset, CocoPeopleDataset]:
    """Train and validation datasets (annotations parsed and validated now, images read lazily)."""
    data = cfg.data
    paths = resolve_data_paths(data)
    for key in ("train_images", "val_images"):
        if not getattr(paths, key).is_dir():
            raise DataError(f"data.{key} directory {getattr(paths, key)} does not exist")
    train_records = read_coco_people(
        paths.train_annotations,
        data.person_category,
        data.min_box_size,
        keep_images_without_people=data.keep_images_without_people,
        max_images=data.max_train_images,
        what="train_annotations",
    )
    val_records = read_coco_people(
        paths.val_annotations,
        data.person_category,
        data.min_box_size,
        keep_images_without_people=True,
        max_images=data.max_val_images,
        what="val_annotations",
    )
    if not data.skip_bad_images:
        check_image_files(train_records, paths.train_images, "train_images")
        check_image_files(val_records, paths.val_images, "val_images")
    train = CocoPeopleDataset(
        train_records, paths.train_images, transform=TrainTransform(data.input_size, data.augment),
        **_dataset_options(cfg),
    )  # fmt: skip
    val = validation_dataset(cfg, val_records, paths.val_images)
    log.info(
        "data: %d train images (%d people), %d val images (%d people)",
        len(train_records),
        sum(len(r.people) for r in train_records),
        len(val_records),
        sum(len(r.people) for r in val_records),
    )
    return train, val


def build_test_dataset(cfg: ExperimentConfig) -> CocoPeopleDataset | None:
    """The held-out test split (data.test_annotations/test_images or data.synthetic.test_images), viewed like
    validation (deterministic letterbox, every image kept, in the annotation file's order: a fixed order, so
    per-image results of two runs on the same data pair up by index); None when no test split is configured."""
    data = cfg.data
    paths = resolve_data_paths(data)
    if paths.test_annotations is None or paths.test_images is None:
        return None
    if not paths.test_images.is_dir():
        raise DataError(f"data.test_images directory {paths.test_images} does not exist")
    records = read_coco_people(
        paths.test_annotations, data.person_category, data.min_box_size, keep_images_without_people=True,
        what="test_annotations",
    )  # fmt: skip
    if not data.skip_bad_images:
        check_image_files(records, paths.test_images, "test_images")
    log.info("data: %d test images (%d people)", len(records), sum(len(r.people) for r in records))
    return validation_dataset(cfg, records, paths.test_images)


def worker_ignores_sigterm(_worker_id: int) -> None:
    """Loader workers leave SIGTERM to the main process. A SIGTERM sent to the whole process group (Slurm
    pre-emption, `kill -- -PGID`, `pkill -f`) would otherwise kill the workers first, and the main process
    would fail with "DataLoader worker ... killed by signal" instead of stopping gracefully (training saves
    last.pth; every command exits 143). Workers still end with the main process: the loader shuts them down,
    they watch their parent, and `_stop_workers_at_exit` covers loaders still alive at exit. Only set through
    `WorkerLoader` (training's `build_loader`, kdlab-predict's and the teacher-cache generator's loaders)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LIVE_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore SIGTERM (`worker_ignores_sigterm`) and are stopped at interpreter exit.

    Python's multiprocessing ends daemonic children at exit with SIGTERM and then joins them without a timeout:
    workers that ignore SIGTERM would hang the exit of any process that still holds their iterator (a
    persistent loader, or a loader kept alive by the traceback of an exiting SystemExit). Every iterator with
    workers is therefore tracked, and `_stop_workers_at_exit` shuts them down the loader's own way first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("worker_init_fn", worker_ignores_sigterm)
        super().__init__(*args, **kwargs)

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(iterator)
        return iterator


def _stop_workers_at_exit() -> None:
    """Registered after multiprocessing's exit handler, so it runs before it (atexit is last in, first out):
    each live iterator shuts its workers down (end-of-work message, join); a worker of ours still alive after
    that (it cannot be stopped with SIGTERM) gets SIGKILL, since nothing is waiting for its work any more."""
    for iterator in list(_LIVE_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                with contextlib.suppress(Exception):
                    worker.kill()


atexit.register(_stop_workers_at_exit)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable[[list[Any]], Any] = collate_people,
) -> DataLoader:
    """A loader over `dataset` with the EpochSeededSampler contract (order and augmentation depend on
    (seed, epoch, position); under DDP each rank gets its block of every global batch); any task's collate."""
    sampler = EpochSeededSampler(len(dataset), shuffle, seed, batch_size, rank, world_size, pad_even=shuffle)
    # The first iter() of a loader draws its workers' base seed. From torch's global RNG that draw would make the
    # RNG state a checkpoint saves depend on when the process started (persistent workers draw once per
    # process), so a resumed run would save another state than an uninterrupted one; the loader's own
    # generator keeps the global RNG out of it. Nothing depends on the base seed (see `kdlab.data.seeds`).
    generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF)
    return WorkerLoader(
        ErrorsAsValues(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=False,
        generator=generator,
    )
