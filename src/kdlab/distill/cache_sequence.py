"""The sequence task's teacher cache: `data` = the inputs [n,T,D_in], `labels` = the teacher's trajectory
[n,T+1,D_out] (its output-state history, t = 0 included), `class_labels` [n]."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.cache import CacheRequest, CacheTeacher
from kdlab.errors import ConfigError


def sequence_preprocessing(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"task": cfg.task, "input_dim": cfg.data.sequence.input_dim, "num_classes": cfg.model.num_classes}


def sequence_fingerprint(dataset: Any) -> str:
    """Identifies a sequence split: the bytes of its inputs and class labels (after data.* selection)."""
    digest = hashlib.sha256(np.ascontiguousarray(dataset.inputs.numpy()).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels.numpy()).tobytes())
    return digest.hexdigest()


class SequenceCacheWriter:
    task = "sequence"
    heads = ["trajectory"]
    symmetrize_flips = False

    @staticmethod
    def sources(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
        from kdlab.data.sequence import SequenceDataset, load_sequence_splits

        splits = load_sequence_splits(cfg.data.sequence, cfg.model.num_classes)
        out = {}
        for name, split in splits.items():
            dataset = SequenceDataset(split)
            out[name] = (dataset, sequence_fingerprint(dataset))
        return out

    preprocessing = staticmethod(sequence_preprocessing)

    @staticmethod
    def load_onnx_teacher(path: Path) -> CacheTeacher:
        raise ConfigError("ONNX teachers are implemented for task=segmentation only, not task=sequence")

    @staticmethod
    def check_teacher(teacher: CacheTeacher, cfg: ExperimentConfig) -> None:
        """The .pth teacher's task was checked when it was loaded; nothing else must match here."""

    @staticmethod
    def write_split(
        group: Any, dataset: Any, indices: np.ndarray, teacher: CacheTeacher, cfg: ExperimentConfig,
        request: CacheRequest, device: torch.device, progress: bool,
    ) -> None:  # fmt: skip
        inputs = dataset.inputs[torch.from_numpy(indices)]
        group.create_dataset("data", data=inputs.numpy().astype(np.float32))
        group.create_dataset("class_labels", data=dataset.labels[torch.from_numpy(indices)].numpy())
        chunks = []
        batch_size = request.batch_size
        starts = range(0, len(indices), batch_size)
        for start in tqdm(
            starts, desc=f"teacher cache {group.name.strip('/')}", unit="batch", disable=not progress
        ):
            chunks.append(teacher.run(inputs[start : start + batch_size])["trajectory"].cpu().numpy())
        group.create_dataset("labels", data=np.concatenate(chunks).astype(np.float32))
