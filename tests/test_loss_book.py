"""The trainer's one home of logged losses (`kdlab.engine.loss_book.LossBook`): what a step adds to the log
interval and the epoch, what taking an interval resets, and what a mid-epoch resume keeps."""

from __future__ import annotations

import torch

from kdlab.engine.distributed import SINGLE
from kdlab.engine.loss_book import EpochProgress, LossBook


def _losses(loss: float, kd: float | None = None) -> dict[str, torch.Tensor]:
    out = {"loss": torch.tensor(loss)}
    if kd is not None:
        out["kd"] = torch.tensor(kd)
    return out


def test_a_step_goes_into_the_interval_and_the_epoch_and_taking_the_interval_resets_only_it():
    book = LossBook(SINGLE)
    book.start_epoch(fresh=True)
    book.add_step([_losses(1.0, 4.0), _losses(3.0)], images=6)
    means, images_per_sec = book.take_interval()
    assert means == {"kd": 4.0, "loss": 2.0} and images_per_sec > 0  # each term over its own count
    assert not book.interval and book.interval_images == 0
    book.add_step([_losses(5.0, 2.0)], images=2)
    assert book.take_interval()[0] == {"kd": 2.0, "loss": 5.0}
    assert book.epoch_means() == {"kd": 3.0, "loss": 3.0}
    assert (book.epoch.images, book.epoch.counts) == (8, {"loss": 3, "kd": 2})


def test_a_skipped_batch_is_counted_and_a_fresh_epoch_starts_empty():
    book = LossBook(SINGLE)
    book.start_epoch(fresh=True)
    book.skip_batch()
    assert book.epoch_means() == {} and book.epoch.skipped == 1
    book.add_step([_losses(1.0)], images=1)
    book.start_epoch(fresh=True)
    assert not book.epoch and book.epoch.images == 0 and book.epoch.skipped == 0


def test_a_mid_epoch_resume_continues_the_saved_sums_images_and_seconds():
    book = LossBook(SINGLE)
    book.start_epoch(fresh=True)
    book.add_step([_losses(2.0)], images=4)
    book.skip_batch()
    book.stamp_seconds()
    saved = book.epoch.to_payload()
    resumed = LossBook(SINGLE)
    resumed.resume_epoch(saved, torch.device("cpu"))
    resumed.start_epoch(fresh=False)
    assert resumed.epoch_seconds() >= saved["seconds"]
    resumed.add_step([_losses(4.0)], images=4)
    assert resumed.epoch_means() == {"loss": 3.0}
    assert (resumed.epoch.images, resumed.epoch.skipped) == (8, 1)
    assert resumed.take_interval()[0] == {"loss": 4.0}  # the log interval starts afresh at the resume


def test_no_epoch_in_progress_resumes_as_an_empty_one():
    book = LossBook(SINGLE)
    book.add_step([_losses(1.0)], images=1)
    book.resume_epoch(None, torch.device("cpu"))
    assert book.epoch == EpochProgress()
