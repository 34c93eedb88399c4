"""The one home of the logged training losses: running sums of the task's loss terms over the log interval
and over the epoch, the images they cover and the time they took.

Sums stay on the device of the losses (adding reads nothing back to the host); a mean is read back once per
log interval and once per epoch, averaged over ranks under DDP. The epoch's part (`EpochProgress`) goes into a
mid-epoch last.pth, so a resumed epoch's metrics.csv row matches an uninterrupted one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kdlab.engine import distributed
from kdlab.engine.distributed import DistContext


@dataclass
class LossSums:
    """Running sums of the task's loss terms over some steps (a log interval, an epoch), kept on the device
    of the losses: adding reads nothing back to the host."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            v = value.detach().float()
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def stacked_means(self) -> tuple[list[str], torch.Tensor]:
        """(sorted keys, their means stacked in one tensor on the losses' device): what one all-reduce
        averages over ranks and one host read turns into numbers."""
        keys = sorted(self.sums)
        return keys, torch.stack([self.sums[k] / self.counts[k] for k in keys])

    def __bool__(self) -> bool:
        return bool(self.sums)


@dataclass
class EpochProgress(LossSums):
    """Running sums of the epoch in progress; saved in a mid-epoch last.pth so a resumed epoch's row
    (metrics.csv) matches an uninterrupted one."""

    images: int = 0
    seconds: float = 0.0
    skipped: int = 0

    def to_payload(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "images": self.images, "seconds": self.seconds, "skipped": self.skipped}  # fmt: skip

    @classmethod
    def from_payload(cls, data: dict[str, Any] | None, device: torch.device) -> EpochProgress:
        if not data:
            return cls()
        return cls({k: v.to(device) for k, v in data["sums"].items()}, dict(data["counts"]),
                   int(data["images"]), float(data["seconds"]), int(data.get("skipped", 0)))  # fmt: skip


class LossBook:
    """What the trainer has logged so far in this epoch and this log interval.

    The loop tells it three things: an epoch starts (`start_epoch`), a batch had nothing readable
    (`skip_batch`), an optimizer step completed with these loss dicts and images (`add_step`). A step that was
    skipped (non-finite, fp16 overflow) is never added. It answers with means (`take_interval`,
    `epoch_means`), throughput and the epoch's seconds so far (`epoch_seconds`, which a mid-epoch save
    stamps into `epoch` with `stamp_seconds`)."""

    def __init__(self, dist: DistContext) -> None:
        self.dist = dist
        self.epoch = EpochProgress()
        self.interval = LossSums()
        self.interval_images = 0
        self._t_start = self._t_interval = time.perf_counter()
        self._seconds_before = 0.0  # the epoch's seconds before this process took it up (a mid-epoch resume)

    def start_epoch(self, fresh: bool) -> None:
        """Start timing an epoch. `fresh`: from its first batch (empty sums); else a mid-epoch resume, which
        continues the sums, images and seconds restored from last.pth (`resume_epoch`)."""
        if fresh:
            self.epoch = EpochProgress()
        self.interval, self.interval_images = LossSums(), 0
        self._t_start = self._t_interval = time.perf_counter()
        self._seconds_before = self.epoch.seconds

    def resume_epoch(self, payload: dict[str, Any] | None, device: torch.device) -> None:
        """The epoch in progress as a mid-epoch last.pth saved it (None: none was in progress)."""
        self.epoch = EpochProgress.from_payload(payload, device)

    def skip_batch(self) -> None:
        """A batch with only unreadable images: counted for the epoch's warning, trained on by no step."""
        self.epoch.skipped += 1

    def add_step(self, window: list[dict[str, torch.Tensor]], images: int) -> None:
        """A completed optimizer step: its micro-batches' loss dicts and their images, into both sums."""
        for losses in window:
            self.epoch.add(losses)
            self.interval.add(losses)
        self.epoch.images += images
        self.interval_images += images

    def means(self, sums: LossSums) -> dict[str, float]:
        """Means of logged loss terms, averaged over ranks under DDP (one all-reduce, one host read)."""
        keys, stacked = sums.stacked_means()
        if self.dist.enabled:
            distributed.all_reduce_sum_(stacked).div_(self.dist.world_size)
        return dict(zip(keys, stacked.tolist(), strict=True))

    def take_interval(self) -> tuple[dict[str, float], float]:
        """The log interval's loss means and images per second over all ranks; its sums start again. The
        clock of the next interval starts at `restart_interval_clock`, after the caller has logged these."""
        elapsed = time.perf_counter() - self._t_interval
        means = self.means(self.interval)
        images_per_sec = self.interval_images * self.dist.world_size / max(elapsed, 1e-9)
        self.interval, self.interval_images = LossSums(), 0
        return means, images_per_sec

    def restart_interval_clock(self) -> None:
        self._t_interval = time.perf_counter()

    def epoch_means(self) -> dict[str, float]:
        """The epoch's loss means ({} when no step completed), averaged over ranks."""
        return self.means(self.epoch) if self.epoch else {}

    def epoch_seconds(self) -> float:
        """Seconds spent on the epoch so far, in this process and before a mid-epoch resume."""
        return self._seconds_before + time.perf_counter() - self._t_start

    def stamp_seconds(self) -> None:
        """Record the epoch's seconds so far in `epoch`, which a mid-epoch last.pth saves."""
        self.epoch.seconds = self.epoch_seconds()
