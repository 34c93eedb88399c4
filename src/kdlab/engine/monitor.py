"""The monitored validation metric and what follows it: which value is better, the plateau LR factor, the
early-stopping counter and the top-k best checkpoints. Each keeps its state as plain numbers and lists so it
goes into last.pth (weights-only loadable) and a resumed run continues exactly."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Mode = Literal["max", "min"]


def default_mode(metric: str) -> Mode:
    """Lower is better for losses and the calibration error; higher for everything else."""
    return "min" if "loss" in metric or metric == "ece" else "max"


def worst_value(mode: Mode) -> float:
    return -math.inf if mode == "max" else math.inf


def is_better(value: float, best: float, mode: Mode, min_delta: float = 0.0) -> bool:
    """`value` beats `best` by more than `min_delta` (a non-finite value never does)."""
    if not math.isfinite(value):
        return False
    return value > best + min_delta if mode == "max" else value < best - min_delta


@dataclass
class PlateauState:
    """Reduce-on-plateau: `factor` is multiplied by `gamma` after `patience` validations without improvement."""

    best: float
    bad: int = 0
    factor: float = 1.0

    def update(self, value: float, mode: Mode, patience: int, gamma: float) -> bool:
        """Record one validation; True when the factor was just reduced."""
        if is_better(value, self.best, mode):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad < patience:
            return False
        self.factor *= gamma
        self.bad = 0
        return True

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> PlateauState:
        return cls(float(data["best"]), int(data["bad"]), float(data["factor"]))


@dataclass
class EarlyStopping:
    """Counts validations whose monitored value did not beat the best by more than `min_delta`."""

    best: float
    bad: int = 0

    def update(self, value: float, mode: Mode, min_delta: float) -> None:
        if is_better(value, self.best, mode, min_delta):
            self.best, self.bad = value, 0
        else:
            self.bad += 1

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> EarlyStopping:
        return cls(float(data["best"]), int(data["bad"]))


def top_k_file(rank: int) -> str:
    """Rank 1 is best_model.pth; rank r > 1 is best_model_top{r}.pth."""
    return "best_model.pth" if rank == 1 else f"best_model_top{rank}.pth"


# The top-k files: best_model.pth, best_model_top{r}.pth, and best_model_moving{n}.pth, where
# `TopK.settle` parks a file for a moment (a crash then leaves it to the next resume, which ranks it too).
_TOP_K_NAME = re.compile(r"best_model(?:_top(\d+)|_moving(\d+))?\.pth")


def top_k_paths(ckpt_dir: Path) -> list[Path]:
    """The top-k files in `ckpt_dir`, in the order of their names' ranks (parked files last)."""

    def order(path: Path) -> tuple[int, int]:
        m = _TOP_K_NAME.fullmatch(path.name)
        assert m is not None
        if m.group(1):
            return (0, int(m.group(1)))
        return (1, int(m.group(2))) if m.group(2) else (0, 1)

    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _TOP_K_NAME.fullmatch(p.name) and p.is_file()), key=order)


@dataclass
class TopK:
    """The k best validated epochs, best first, each with its checkpoint file name (by rank)."""

    k: int
    entries: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "value", "file"}

    def rank_of(self, value: float, mode: Mode) -> int | None:
        """1-based rank a new `value` would take (ties rank after the earlier epochs), or None: not in the top k."""
        if not math.isfinite(value):
            return None
        at_least = sum(1 for e in self.entries if not is_better(value, e["value"], mode))
        return at_least + 1 if at_least < self.k else None

    def insert(self, epoch: int, value: float, rank: int, ckpt_dir: Path | None) -> list[tuple[str, str]]:
        """Put (epoch, value) at `rank`: the files from `rank` down shift one rank (os.replace, atomic; the one
        that falls out of the top k is replaced, so it is gone). Returns the renames done, bottom first. The
        caller then writes the new checkpoint to `top_k_file(rank)`. `ckpt_dir` None: bookkeeping only."""
        renames = []
        last = min(len(self.entries), self.k - 1)
        for r in range(last, rank - 1, -1):
            src, dst = top_k_file(r), top_k_file(r + 1)
            if ckpt_dir is not None and (ckpt_dir / src).is_file():
                os.replace(ckpt_dir / src, ckpt_dir / dst)
            renames.append((src, dst))
        self.entries.insert(rank - 1, {"epoch": epoch, "value": value, "file": top_k_file(rank)})
        del self.entries[self.k :]
        for r, entry in enumerate(self.entries, start=1):
            entry["file"] = top_k_file(r)
        return renames

    def shrink(self, ckpt_dir: Path | None) -> None:
        """Keep only the first k entries (a run resumed with a smaller save_top_k) and delete the rest's files."""
        for entry in self.entries[self.k :]:
            if ckpt_dir is not None:
                (ckpt_dir / entry["file"]).unlink(missing_ok=True)
        del self.entries[self.k :]

    def to_payload(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    @classmethod
    def from_files(
        cls,
        k: int,
        ckpt_dir: Path,
        mode: Mode,
        resumed_epoch: int,
        read: Callable[[Path], tuple[int, float] | None],
    ) -> tuple[TopK, list[str]]:
        """The top-k list as the files in `ckpt_dir` hold it, for a run resumed after `resumed_epoch` epochs.

        A run killed at an epoch end after shifting the files down a rank (and maybe after writing the new
        one) but before that epoch's last.pth leaves files that the list saved in last.pth no longer
        describes. So the list is rebuilt from the files: `read(path)` gives a file's (epoch, monitored
        value), or None for a file it cannot rank, which is left alone. Files of an epoch after
        `resumed_epoch` (that epoch is trained again and re-ranked) and second copies of an epoch are
        deleted; the rest are ranked (ties: the earlier epoch first, as `rank_of` does), renamed to their
        rank's name and cut to k. Returns the list and the names of the deleted files."""
        entries: list[dict[str, Any]] = []
        removed: list[str] = []
        for path in top_k_paths(ckpt_dir):
            info = read(path)
            if info is None:
                continue
            epoch, value = info
            if epoch > resumed_epoch or not math.isfinite(value) or any(e["epoch"] == epoch for e in entries):
                path.unlink(missing_ok=True)
                removed.append(path.name)
                continue
            entries.append({"epoch": epoch, "value": value, "file": path.name})
        entries.sort(key=lambda e: (-e["value"] if mode == "max" else e["value"], e["epoch"]))
        top = cls(k, entries)
        removed += top.settle(ckpt_dir)
        return top, removed

    def settle(self, ckpt_dir: Path) -> list[str]:
        """Rename each entry's file to its rank's name (`os.replace`; a file in the way that belongs further
        down is parked under a spare name first), then delete the files past rank k. Returns those."""
        for rank, entry in enumerate(self.entries[: self.k], start=1):
            target = top_k_file(rank)
            if entry["file"] == target:
                continue
            occupant = next((e for e in self.entries[rank:] if e["file"] == target), None)
            if occupant is not None:
                n = 1
                while (ckpt_dir / f"best_model_moving{n}.pth").exists():
                    n += 1
                os.replace(ckpt_dir / target, ckpt_dir / f"best_model_moving{n}.pth")
                occupant["file"] = f"best_model_moving{n}.pth"
            os.replace(ckpt_dir / entry["file"], ckpt_dir / target)
            entry["file"] = target
        dropped = [e["file"] for e in self.entries[self.k :]]
        self.shrink(ckpt_dir)
        return dropped

    @classmethod
    def from_payload(cls, k: int, data: list[dict[str, Any]]) -> TopK:
        entries = [
            {"epoch": int(e["epoch"]), "value": float(e["value"]), "file": str(e["file"])} for e in data
        ]
        return cls(k, entries)
