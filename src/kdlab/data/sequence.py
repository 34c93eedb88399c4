"""Sequence-classification data: an HDF5 file of [N, T, D_in] sequences, or a generated synthetic one.

HDF5 layout (`data.sequence.path`): groups `train`, `val` and optionally `test`, each with datasets `data`
float32 [N, T, D_in] and `labels` int64 [N] in [0, model.num_classes). `read_sequence_hdf5` validates the
whole file up front, one DataError line per problem, so a bad file fails before any run directory exists.

The synthetic source (`generate_synthetic_sequences`) is written once to the same layout, atomically, with
its generator parameters as HDF5 attributes; a file generated with other parameters is an error rather
than silently reused or overwritten.

Batches are dicts: `inputs` float32 [B, T, D_in], `labels` int64 [B], `index` int64 [B] (row in the
split), plus one stacked entry per `extra` array given to `SequenceDataset` (e.g. `teacher_trajectory`
[B, T+1, C] from an offline teacher-output cache).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdlab.atomic_io import atomic_write
from kdlab.config.schema import ExperimentConfig, SequenceDataConfig
from kdlab.data.classification import stratified_subset
from kdlab.data.loaders import build_loader, readable_samples
from kdlab.errors import DataError

log = logging.getLogger(__name__)

REQUIRED_SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)
GENERATOR_VERSION = 1  # bump when the generator's maths change, so old files are not silently reused
SIGNAL_CHANNELS = 4  # channels that carry class evidence; the rest are distractors


@dataclass
class SequenceSplit:
    """One split: `data` float32 [N, T, D_in], `labels` int64 [N]."""

    data: np.ndarray
    labels: np.ndarray

    def subset(self, indices: np.ndarray) -> SequenceSplit:
        return SequenceSplit(self.data[indices], self.labels[indices])


# ------------------------------------------------------------------------------------------ synthetic
def synthetic_parameters(cfg: SequenceDataConfig, num_classes: int) -> dict[str, Any]:
    """The parameters that determine a generated file (stored as its HDF5 attributes)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "train_samples": cfg.train_samples,
        "val_samples": cfg.val_samples,
        "test_samples": cfg.test_samples,
        "seq_len": cfg.seq_len,
        "input_dim": cfg.input_dim,
        "num_classes": num_classes,
        "noise": float(cfg.noise),
        "seed": cfg.seed,
    }


def _class_patterns(rng: np.random.Generator, num_classes: int, signal: int) -> dict[str, np.ndarray]:
    """Per class: a frequency (cycles per sequence), per-channel phase offsets and gains, and a trend."""
    # Frequencies of neighbouring classes are close, so a class is told apart by the relative phases of
    # its channels (invariant to each sample's random global phase): evidence accumulates over time.
    freqs = rng.uniform(2.0, 5.0, size=num_classes)
    return {
        "freq": freqs,
        "phase": rng.uniform(0.0, 2 * math.pi, size=(num_classes, signal)),
        "gain": rng.uniform(0.5, 1.0, size=(num_classes, signal))
        * rng.choice([-1.0, 1.0], (num_classes, signal)),
        "trend": rng.uniform(-0.6, 0.6, size=(num_classes, signal)),
    }


def _generate_split(
    rng: np.random.Generator,
    patterns: dict[str, np.ndarray],
    n: int,
    seq_len: int,
    input_dim: int,
    noise: float,
) -> SequenceSplit:
    num_classes, signal = patterns["phase"].shape
    signal = min(signal, input_dim)
    labels = np.arange(n, dtype=np.int64) % num_classes  # balanced, then shuffled
    labels = labels[rng.permutation(n)]
    t = np.linspace(0.0, 1.0, seq_len, dtype=np.float64)[None, :, None]  # [1, T, 1]
    global_phase = rng.uniform(0.0, 2 * math.pi, size=(n, 1, 1))
    amplitude = rng.uniform(0.7, 1.3, size=(n, 1, 1))
    freq = patterns["freq"][labels][:, None, None] * rng.uniform(0.9, 1.1, size=(n, 1, 1))
    phase = patterns["phase"][labels][:, None, :signal]  # [N, 1, S]
    gain = patterns["gain"][labels][:, None, :signal]
    trend = patterns["trend"][labels][:, None, :signal]
    x = np.empty((n, seq_len, input_dim), dtype=np.float64)
    x[:, :, :signal] = amplitude * gain * np.sin(2 * math.pi * freq * t + global_phase + phase) + trend * (
        t - 0.5
    )
    if input_dim > signal:  # distractors: sinusoids of random frequency and phase, no class information
        k = input_dim - signal
        d_freq = rng.uniform(1.0, 6.0, size=(n, 1, k))
        d_phase = rng.uniform(0.0, 2 * math.pi, size=(n, 1, k))
        x[:, :, signal:] = rng.uniform(0.5, 1.3, size=(n, 1, k)) * np.sin(2 * math.pi * d_freq * t + d_phase)
    x += rng.normal(0.0, noise, size=x.shape)
    return SequenceSplit(x.astype(np.float32), labels)


def generate_synthetic_sequences(params: dict[str, Any]) -> dict[str, SequenceSplit]:
    """Deterministic (in `params`, see `synthetic_parameters`) splits of a C-class sequence task.

    Each class is a latent oscillation with its own frequency, per-channel phase offsets, gains and linear
    trends on the first 4 channels; each sample draws a random global phase, amplitude and a +-10 %
    frequency jitter; any further channels are distractor sinusoids; Gaussian noise covers every channel.
    """
    rng = np.random.default_rng([int(params["seed"]) & 0xFFFFFFFF, GENERATOR_VERSION])
    patterns = _class_patterns(rng, int(params["num_classes"]), SIGNAL_CHANNELS)
    splits: dict[str, SequenceSplit] = {}
    for i, name in enumerate(("train", "val", "test")):
        n = int(params[f"{name}_samples"])
        if n > 0:
            split_rng = np.random.default_rng([int(params["seed"]) & 0xFFFFFFFF, GENERATOR_VERSION, i + 1])
            splits[name] = _generate_split(
                split_rng,
                patterns,
                n,
                int(params["seq_len"]),
                int(params["input_dim"]),
                float(params["noise"]),
            )
    return splits


def write_sequence_hdf5(
    path: str | Path, splits: dict[str, SequenceSplit], attrs: dict[str, Any] | None = None
) -> Path:
    """Write `splits` in the HDF5 layout (temp file + rename, so a crash never leaves a torn file)."""
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            for key, value in (attrs or {}).items():
                fh.attrs[key] = value
            for name, split in splits.items():
                group = fh.create_group(name)
                group.create_dataset("data", data=split.data.astype(np.float32))
                group.create_dataset("labels", data=split.labels.astype(np.int64))

    return atomic_write(path, write)


def _read_attrs(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise DataError(f"data.sequence.path {path} is not a readable HDF5 file ({exc})") from exc


def ensure_synthetic_sequences(cfg: SequenceDataConfig, num_classes: int) -> Path:
    """Generate the synthetic file at `cfg.path` unless it exists; an existing file made with other generator
    parameters is a DataError (never overwritten: it may be someone's data)."""
    path = Path(cfg.path)
    params = synthetic_parameters(cfg, num_classes)
    if path.exists():
        stored = _read_attrs(path)
        diffs = [f"{k}={stored.get(k)!r} (config {v!r})" for k, v in params.items() if stored.get(k) != v]
        if diffs:
            raise DataError(
                f"data.sequence.path {path} was generated with other synthetic parameters: {', '.join(diffs)}; "
                "delete it or set data.sequence.path to another file"
            )
        return path
    log.info("generating synthetic sequences into %s (%s)", path, params)
    write_sequence_hdf5(path, generate_synthetic_sequences(params), params)
    return path


# ------------------------------------------------------------------------------------------- reading
def read_sequence_hdf5(
    path: str | Path, num_classes: int, input_dim: int | None = None
) -> dict[str, SequenceSplit]:
    """Read and validate every split of an HDF5 sequence file; each problem is one DataError line."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.sequence.path file {path} does not exist")
    if not h5py.is_hdf5(path):
        raise DataError(f"data.sequence.path file {path} is not an HDF5 file")
    splits: dict[str, SequenceSplit] = {}
    with h5py.File(path, "r") as fh:
        for name in REQUIRED_SPLITS:
            if name not in fh or not isinstance(fh[name], h5py.Group):
                raise DataError(
                    f"{path} has no '{name}' group (expected groups train, val and optionally test)"
                )
        for name in (*REQUIRED_SPLITS, *OPTIONAL_SPLITS):
            if name in fh:
                splits[name] = _read_split(fh[name], f"{path}:/{name}")
    dims = {name: s.data.shape[2] for name, s in splits.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"{path}: the splits have different D_in (data.shape[2]): {dims}")
    for name, split in splits.items():
        where = f"{path}:/{name}"
        if split.labels.size and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            bad = int(split.labels.min() if split.labels.min() < 0 else split.labels.max())
            raise DataError(
                f"{where}/labels has label {bad} outside [0, {num_classes}); set model.num_classes to the data's"
            )
        if not np.isfinite(split.data).all():
            count = int((~np.isfinite(split.data)).sum())
            raise DataError(f"{where}/data has {count} non-finite values (NaN or inf)")
        if split.data.shape[0] == 0:
            raise DataError(f"{where} is empty (N = 0)")
    d_in = dims["train"]
    if input_dim is not None and d_in != input_dim:
        raise DataError(
            f"{path} has D_in={d_in} features per step but data.sequence.input_dim={input_dim}; "
            f"set data.sequence.input_dim={d_in}"
        )
    return splits


def _read_split(group: Any, where: str) -> SequenceSplit:
    import h5py

    for key in ("data", "labels"):
        if key not in group or not isinstance(group[key], h5py.Dataset):
            raise DataError(f"{where} has no '{key}' dataset")
    data, labels = group["data"], group["labels"]
    if data.ndim != 3:
        raise DataError(f"{where}/data must be 3-D [N, T, D_in], got shape {list(data.shape)}")
    if labels.ndim != 1:
        raise DataError(f"{where}/labels must be 1-D [N], got shape {list(labels.shape)}")
    if data.shape[0] != labels.shape[0]:
        raise DataError(f"{where}: data has N={data.shape[0]} sequences but labels has {labels.shape[0]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}/labels must be integers, got {labels.dtype}")
    try:
        values = np.asarray(data[()], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}/data is not numeric ({data.dtype})") from exc
    return SequenceSplit(values, np.asarray(labels[()], dtype=np.int64))


def load_sequence_splits(cfg: SequenceDataConfig, num_classes: int) -> dict[str, SequenceSplit]:
    """The configured source's splits (generated first for synthetic), train subset applied."""
    if cfg.source == "synthetic":
        ensure_synthetic_sequences(cfg, num_classes)
    splits = read_sequence_hdf5(cfg.path, num_classes, cfg.input_dim)
    if cfg.max_train_samples is not None:
        keep = stratified_subset(splits["train"].labels, cfg.max_train_samples, cfg.subset_seed)
        splits["train"] = splits["train"].subset(keep)
    return splits


# ------------------------------------------------------------------------------------------- dataset
class SequenceDataset(Dataset):
    """Items by int or `(index, seed)` (the sampler's form): {"inputs": float32 [T, D_in], "labels": int64,
    "index": int64, **extra}; `extra` holds per-sample arrays (first dim N, the split's order), e.g. a cached
    teacher trajectory, returned under their own keys."""

    def __init__(
        self, split: SequenceSplit, extra: dict[str, np.ndarray | torch.Tensor] | None = None
    ) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(split.data, dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
        self.extra: dict[str, torch.Tensor] = {}
        for key, value in (extra or {}).items():
            tensor = torch.as_tensor(value)
            if tensor.shape[0] != len(self.labels):
                raise DataError(
                    f"extra array '{key}' has {tensor.shape[0]} rows but the split has {len(self.labels)}"
                )
            if key in ("inputs", "labels", "index"):
                raise ValueError(f"extra key '{key}' would replace a sample field")
            self.extra[key] = tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        sample = {
            "inputs": self.inputs[index],
            "labels": self.labels[index],
            "index": torch.tensor(index, dtype=torch.int64),
        }
        for key, tensor in self.extra.items():
            sample[key] = tensor[index]
        return sample


def collate_sequences(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack every key of the samples: inputs [B,T,D], labels [B], index [B], extras [B, ...]."""
    error, present = readable_samples(samples)
    if error is not None or not present:
        return error
    return {key: torch.stack([s[key] for s in present]) for key in present[0]}


def build_sequence_datasets(cfg: ExperimentConfig) -> tuple[SequenceDataset, SequenceDataset]:
    """Train and validation datasets of the configured source (validated, held in memory)."""
    data = cfg.data.sequence
    splits = load_sequence_splits(data, cfg.model.num_classes)
    train, val = splits["train"], splits["val"]
    log.info(
        "data (sequence, %s): %d train, %d val sequences of T=%d, D_in=%d, %d classes",
        data.source, len(train.labels), len(val.labels), train.data.shape[1], train.data.shape[2],
        cfg.model.num_classes,
    )  # fmt: skip
    return SequenceDataset(train), SequenceDataset(val)


def build_sequence_test_dataset(cfg: ExperimentConfig) -> SequenceDataset | None:
    """The file's optional `test` group (synthetic: written when data.sequence.test_samples > 0), in its stored
    order; None when the file has none. Validation picks the checkpoint, this split reports it."""
    splits = load_sequence_splits(cfg.data.sequence, cfg.model.num_classes)
    test = splits.get("test")
    if test is None:
        return None
    log.info("data (sequence): %d test sequences", len(test.labels))
    return SequenceDataset(test)


def build_sequence_loader(*args: Any, **kwargs: Any) -> DataLoader:
    """The shared loader (`kdlab.data.loaders.build_loader`) with the sequence collate."""
    return build_loader(*args, collate_fn=collate_sequences, **kwargs)


def check_sequence_inputs(cfg: SequenceDataConfig) -> None:
    """Cheap check before any work: an hdf5 source file must exist."""
    if cfg.source == "hdf5" and not Path(cfg.path).is_file():
        raise DataError(f"data.sequence.path file {cfg.path} does not exist (data.sequence.source=hdf5)")
