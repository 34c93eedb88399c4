"""Each run records what its numbers depend on besides the config (torch, hardware, threads, AMP), and the
report says so when the runs of one table differ (issue 27, item 3)."""

from __future__ import annotations

import json

import torch
from torch import nn

from kdlab.config.schema import ExperimentConfig, TrainingConfig
from kdlab.engine.trainer import Trainer
from kdlab.experiments.report.provenance import provenance_note
from kdlab.experiments.report.run_files import RunRecord


def test_summary_records_the_runs_provenance(tmp_path):
    cfg = ExperimentConfig(training=TrainingConfig(epochs=1, amp="bf16", channels_last=False, device="cpu"))
    batch = {"inputs": torch.randn(2, 3), "targets": torch.randn(2, 1)}

    def task(model, b):
        return {"loss": ((model(b["inputs"]) - b["targets"]) ** 2).mean()}

    trainer = Trainer(cfg, nn.Linear(3, 1), task, [batch], lambda m, desc="val": ({}, None), tmp_path,
                      torch.device("cpu"), show_progress=False)  # fmt: skip
    trainer.fit()
    prov = json.loads((tmp_path / "summary.json").read_text())["provenance"]
    assert prov["torch"] == torch.__version__ and prov["threads"] == torch.get_num_threads()
    assert prov["amp"] == "bfloat16" and prov["device"] == "cpu" and prov["device_name"]


def _run(tmp_path, name: str, **prov) -> RunRecord:
    run = tmp_path / name
    run.mkdir()
    base = {"torch": "2.11", "device_name": "NVIDIA H200", "threads": 8, "amp": "bfloat16"}
    (run / "summary.json").write_text(json.dumps({"provenance": {**base, **prov}}))
    return RunRecord(name, run, "completed")


def test_the_report_names_what_differs_between_runs(tmp_path):
    same = [_run(tmp_path, "a"), _run(tmp_path, "b")]
    assert provenance_note(same) is None
    old = RunRecord("old", tmp_path / "no_summary", "completed")  # written before provenance existed
    assert provenance_note([*same, old]) is None
    note = provenance_note([*same, _run(tmp_path, "c", threads=2, amp="off")])
    assert note is not None
    assert "threads (8: a, b; 2: c)" in note and "amp (bfloat16: a, b; off: c)" in note
    assert "torch" not in note and "device_name" not in note
