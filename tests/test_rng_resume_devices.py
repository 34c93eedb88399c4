"""Restoring RNG states when the machine differs from the one that saved them: fewer or more visible GPUs than
the checkpoint has CUDA states for, or none at all. No GPU needed: torch.cuda's queries and setters are faked,
the fake setter failing like the real one for a device that does not exist."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.cuda.random

from kdlab.engine.state import capture_rng_state, restore_rng_state


def _cuda(monkeypatch, visible: int) -> list[tuple[int, int]]:
    """`visible` fake GPUs; returns the (device, state's first byte) of every CUDA RNG state set."""
    calls: list[tuple[int, int]] = []

    def set_rng_state(new_state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= visible:  # what torch.cuda.default_generators[index] does
            raise IndexError("tuple index out of range")
        calls.append((index, int(new_state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    return calls


def _saved_on_gpus(n: int) -> dict:
    state = capture_rng_state()  # on this CPU-only machine: no "cuda" entry
    state["cuda"] = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(n)]
    return state


def test_fewer_visible_gpus_restore_the_ones_that_exist_and_warn_once(monkeypatch, caplog):
    calls = _cuda(monkeypatch, visible=2)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.state"):
        restore_rng_state(_saved_on_gpus(4))
    assert calls == [(0, 10), (1, 11)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 CUDA devices" in warnings[0].getMessage() and "2 are visible" in warnings[0].getMessage()
    assert "not guaranteed" in warnings[0].getMessage()


def test_more_visible_gpus_restore_the_saved_ones_and_warn(monkeypatch, caplog):
    calls = _cuda(monkeypatch, visible=3)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.state"):
        restore_rng_state(_saved_on_gpus(1))
    assert calls == [(0, 10)]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_same_gpu_count_restores_every_device_silently(monkeypatch, caplog):
    calls = _cuda(monkeypatch, visible=2)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.state"):
        restore_rng_state(_saved_on_gpus(2))
    assert calls == [(0, 10), (1, 11)] and not caplog.records


@pytest.mark.parametrize("saved_gpus", [0, 2])
def test_a_gpu_checkpoint_resumes_on_cpu_with_the_cpu_states_restored(monkeypatch, caplog, saved_gpus):
    calls = _cuda(monkeypatch, visible=0)
    state = _saved_on_gpus(saved_gpus)
    expected = torch.rand(3)  # the draws right after the capture
    torch.manual_seed(1234)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.state"):
        restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected) and calls == [] and not caplog.records
