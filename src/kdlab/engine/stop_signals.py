"""SIGINT/SIGTERM during training: finish the current step, save last.pth, then stop.

The handlers only set a flag that the training loop reads at optimizer-step boundaries (and at epoch
ends); the loop then saves `last.pth` and raises `TrainingInterrupted`, which the CLI turns into exit
130 (SIGINT) or 143 (SIGTERM) with the exact resume command.

A second signal stops at once: the handler raises `StoppedAtOnce` wherever the main thread is (inside a
step, even inside a checkpoint write, whose temp file is then dropped, so the previous file stands). It is a
`BaseException`, so no `except Exception` on the way swallows it; the trainer turns it into a
`TrainingInterrupted` (status `interrupted`, exit 128 + signal, one line naming the last saved last.pth).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

from kdlab.engine.launch import resume_command


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state; `exit_code` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StoppedAtOnce(BaseException):
    """A second SIGINT/SIGTERM while a graceful stop was pending: the run stops where it is, unsaved."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM request a graceful stop instead of killing the run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopping_at_once = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping_at_once:  # a third signal: the stop is under way already
            return
        if self.signum is not None:  # second signal: stop now
            self.stopping_at_once = True
            raise StoppedAtOnce(signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def where_stopped(epoch: int, batches_done: int) -> str:
    """ "epoch 3" at an epoch boundary, "epoch 3 + 5 batches" inside epoch 4."""
    return f"epoch {epoch}" + (f" + {batches_done} batches" if batches_done else "")


def interrupted_after_save(signum: int, step: int, where: str, last: Path) -> TrainingInterrupted:
    """The one-line outcome of a graceful stop: last.pth was saved after `step`, resume from it."""
    return TrainingInterrupted(
        signum,
        f"stopped by {signal.Signals(signum).name} after step {step} ({where}); "
        f"saved {last}; resume with: {resume_command(last)}",
    )


def interrupted_at_once(
    signum: int, step: int, where: str, last: Path, saved_step: int | None
) -> TrainingInterrupted:
    """The one-line outcome of a second signal: nothing was saved for it, the last complete last.pth
    (atomic writes: never a half-written one; of step `saved_step` when this process wrote it) is where a
    resume continues."""
    name = signal.Signals(signum).name
    head = f"stopped at once by a second {name} after step {step} ({where}), without saving"
    if not last.is_file():
        return TrainingInterrupted(
            signum, f"{head}; no last.pth was saved yet; start again with: {resume_command(Path('auto'))}"
        )
    saved = f" (step {saved_step})" if saved_step is not None else ""
    return TrainingInterrupted(signum, f"{head}; {last}{saved} stands; resume with: {resume_command(last)}")
