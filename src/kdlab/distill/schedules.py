"""Scalar schedules over training progress (e.g. for the KD weight alpha or the temperature)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Schedule", "ScheduleKind"]

ScheduleKind = Literal["constant", "linear", "cosine"]
_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """A value that moves from `start` (progress 0) to `end` (progress 1).

    - constant: `start` everywhere (`end` is ignored);
    - linear:   `start + (end - start) · p`;
    - cosine:   `end + (start - end) · 0.5 · (1 + cos(pi · p))` (flat at both ends).
    """

    kind: ScheduleKind
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Schedule kind must be one of {_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"Schedule start/end must be finite, got {self.start}, {self.end}")

    def value(self, progress: float) -> float:
        """Value at `progress`, clamped to [0, 1] first (e.g. step / total_steps); NaN raises ValueError."""
        if math.isnan(progress):
            raise ValueError("Schedule progress must not be NaN")
        p = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "linear":
            return float(self.start + (self.end - self.start) * p)
        return float(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p)))
