"""`--gpus` ids are indices into the runner's own visible CUDA devices; a child is pinned to the matching
entries of the runner's CUDA_VISIBLE_DEVICES (ids or UUIDs), or to the physical ids when the runner has none.
No GPU needed: torch.cuda.device_count and the environment are faked."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import ConfigError
from kdlab.experiments.scheduler import SlotPool, parse_gpus


def _visible(monkeypatch, count: int, parent: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)


def _pinned(gpus: list[int], per_run: int = 1) -> list[str]:
    pool = SlotPool(gpus, parallel=None, cpus=8)
    out = []
    while (slot := pool.acquire(per_run)) is not None:
        out.append(slot.env()["CUDA_VISIBLE_DEVICES"])
    return out


def test_gpus_all_under_a_restricted_runner_pins_children_to_the_runners_devices(monkeypatch):
    _visible(monkeypatch, 2, "2,3")
    gpus = parse_gpus("all")
    assert gpus == [0, 1]  # torch's numbering inside the runner
    assert _pinned(gpus) == ["2", "3"]  # what the children must be given: the physical GPUs 2 and 3
    assert _pinned(gpus, per_run=2) == ["2,3"]


def test_explicit_ids_index_the_runners_visible_set_including_uuids(monkeypatch):
    _visible(monkeypatch, 3, "GPU-aaaa, GPU-bbbb,MIG-cccc")
    assert _pinned(parse_gpus("2,0")) == ["MIG-cccc", "GPU-aaaa"]


def test_without_a_parent_mask_the_ids_are_the_physical_ids(monkeypatch):
    _visible(monkeypatch, 4, None)
    assert _pinned(parse_gpus("all")) == ["0", "1", "2", "3"]
    assert _pinned(parse_gpus("3,1")) == ["3", "1"]


@pytest.mark.parametrize(("parent", "count"), [(None, 2), ("5,6", 2)])
def test_an_id_beyond_the_visible_devices_is_a_one_line_config_error(monkeypatch, parent, count):
    _visible(monkeypatch, count, parent)
    with pytest.raises(
        ConfigError, match=r"--gpus 0,2: device 2 is not visible to the runner \(2 visible"
    ) as err:
        parse_gpus("0,2")
    assert "\n" not in str(err.value)


def test_when_torch_sees_no_device_the_parents_mask_still_bounds_the_ids(monkeypatch):
    _visible(monkeypatch, 0, "7")
    assert _pinned(parse_gpus("0")) == ["7"]
    with pytest.raises(ConfigError, match=r"device 1 is not visible to the runner \(1 visible"):
        parse_gpus("0,1")
