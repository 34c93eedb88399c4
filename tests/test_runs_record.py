"""experiment_runs.json shared by several runner invocations: records merge under a lock, none is lost, and the
report says which runs it pooled over seeds (a run without a seed is not pooled with its config's seed runs).
No training: the runner's `run_all` and the report files are replaced by stand-ins."""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kdlab.experiments import orchestrate as orchestrate_module
from kdlab.experiments import report as report_package
from kdlab.experiments import report_latency
from kdlab.experiments.report import RunRecord, aggregate_rows, collect_rows, write_report
from kdlab.experiments.runner import RunResult
from kdlab.experiments.runs_record import RECORDED_AT, lock_path_of, merge_records, record_runs
from tests.test_report import B0, B3, fabricate_run

FORK = multiprocessing.get_context("fork")


# ------------------------------------------------------------------------------------------- stand-ins
@pytest.fixture
def fake_training(monkeypatch):
    """Invocations of `orchestrate` without training or report files: every planned run "completes" at once
    (`hooks[run name]()` is called just before it is recorded). Returns (invoke, hooks)."""
    hooks: dict[str, Any] = {}

    def run_all(planned, flags_argv, out, *, on_result=None, delay_s: float = 0.0, **_: Any):
        results = []
        for p in planned:
            if p.run_name in hooks:
                hooks[p.run_name]()
            if delay_s:
                time.sleep(random.uniform(0, delay_s))
            result = RunResult(
                p.run_name, p.config_name, str(p.run_dir()), "completed", 0, 0.1, ["fake"], "",
                p.config.model_dump(mode="json"), seed=p.seed, group=p.group or p.run_name,
            )  # fmt: skip
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    monkeypatch.setattr(orchestrate_module, "run_all", run_all)
    monkeypatch.setattr(report_package, "write_report", lambda rows, out, records: {})
    monkeypatch.setattr(report_latency, "measure_report_latency", lambda runs, out: {})
    return hooks


def invoke(out: Path, configs: list[str], seeds: list[int] | None = None) -> int:
    status, _ = orchestrate_module.orchestrate(
        configs, [], {"output_dir": str(out)}, [], [], out, resume=False, fail_fast=False, skip_training=False,
        export=False, seeds=seeds,
    )  # fmt: skip
    return status


def recorded(out: Path) -> list[str]:
    return [r["name"] for r in json.loads((out / "experiment_runs.json").read_text())]


# ------------------------------------------------------------------------- (a) invocations one after another
def test_invocations_into_one_dir_keep_every_record_even_if_one_ends_during_another(tmp_path, fake_training):
    """The reported loss: invocation 1 (teacher, baseline) read the file when it started and rewrote it from
    that copy, so the records of invocation 2, which ended meanwhile, were gone; then invocation 3 adds more."""
    out = tmp_path / "runs"
    fake_training["quickstart_baseline"] = lambda: invoke(out, ["quickstart_distill"], seeds=[0, 1])
    assert invoke(out, ["quickstart_teacher", "quickstart_baseline"]) == 0
    assert invoke(out, ["quickstart_baseline"], seeds=[0, 1]) == 0
    # each invocation's records in its own order, where they first entered the file
    assert recorded(out) == [
        "quickstart_teacher", "quickstart_distill__seed-0", "quickstart_distill__seed-1", "quickstart_baseline",
        "quickstart_baseline__seed-0", "quickstart_baseline__seed-1",
    ]  # fmt: skip
    assert lock_path_of(out / "experiment_runs.json").is_file()


def test_a_record_with_a_key_this_version_does_not_know_is_kept_not_wiped(tmp_path, fake_training):
    """A file another kdlab version wrote (a record with an extra key) was 'unreadable' to this one, which then
    replaced it with its own records alone."""
    out = tmp_path / "runs"
    out.mkdir()
    other = {"name": "old_run", "config_name": "old_run", "run_dir": str(out / "old_run"), "status": "completed",
             "exit_code": 0, "duration_s": 1.0, "command": [], "job_id": "1234"}  # fmt: skip
    (out / "experiment_runs.json").write_text(json.dumps([other]))
    assert invoke(out, ["quickstart_baseline"]) == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [r["name"] for r in runs] == ["old_run", "quickstart_baseline"]
    assert runs[0]["job_id"] == "1234"


def test_an_unreadable_file_is_moved_aside_not_overwritten(tmp_path):
    path = tmp_path / "experiment_runs.json"
    path.write_text('[{"name": "a"')  # torn by some other tool
    assert [r["name"] for r in record_runs(path, [{"name": "b"}])] == ["b"]
    (kept,) = tmp_path.glob("experiment_runs.json.unreadable-*")
    assert kept.read_text() == '[{"name": "a"'


def test_a_newer_record_of_a_run_replaces_the_older_and_an_older_one_loses():
    old = {"name": "x", "status": "failed", RECORDED_AT: 10.0}
    new = {"name": "x", "status": "completed", RECORDED_AT: 20.0}
    assert merge_records([old], [new]) == [new]
    assert merge_records([new], [old]) == [new]  # a runner's stale copy does not undo a later rerun
    # a run found finished on disk keeps its training record and gains the export
    exists = {"name": "x", "status": "exists", "export": {"ok": True}, RECORDED_AT: 30.0}
    assert merge_records([new], [exists]) == [{**new, "export": {"ok": True}}]
    # ... and the directory it was found in: the old path was relative to the first runner's working directory
    trained = {**new, "run_dir": "experiments/x", "duration_s": 200.0}
    found = {**exists, "run_dir": "/elsewhere/experiments/x"}
    assert merge_records([trained], [found]) == [
        {**trained, "run_dir": "/elsewhere/experiments/x", "export": {"ok": True}}
    ]
    # records never move; a new one goes before the next record of its batch already in the file
    file = [{"name": "p"}, {"name": "c"}]
    batch = [{"name": n} for n in ("a", "b", "c")]
    assert [r["name"] for r in merge_records(file, batch)] == ["p", "a", "b", "c"]


# ------------------------------------------------------------------------------------ (b) concurrent writers
def _hammer(path: str, prefix: str, n: int) -> None:
    for i in range(n):
        record_runs(Path(path), [{"name": f"{prefix}{i}", "status": "completed"}])


def test_two_processes_merging_at_once_lose_nothing_and_the_file_is_always_valid_json(tmp_path):
    path = tmp_path / "experiment_runs.json"
    writers = [FORK.Process(target=_hammer, args=(str(path), prefix, 50)) for prefix in ("a", "b")]
    for w in writers:
        w.start()
    seen = 0
    while any(w.is_alive() for w in writers):  # a reader never sees a torn or shrinking file
        if path.is_file():
            names = [r["name"] for r in json.loads(path.read_text())]
            assert len(names) >= seen and len(set(names)) == len(names)
            seen = len(names)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert sorted(recorded(tmp_path)) == sorted(f"{p}{i}" for p in "ab" for i in range(50))


def _invoke_slowly(out: str, config: str, seeds: list[int]) -> None:
    orchestrate_module.run_all = _slow(orchestrate_module.run_all)
    invoke(Path(out), [config], seeds=seeds)


def _slow(run_all: Any) -> Any:
    return lambda *args, **kwargs: run_all(*args, delay_s=0.004, **kwargs)


def test_two_runners_writing_one_output_dir_at_once_keep_each_others_records(tmp_path, fake_training):
    out = tmp_path / "runs"
    seeds = list(range(25))
    runners = [
        FORK.Process(target=_invoke_slowly, args=(str(out), config, seeds))
        for config in ("quickstart_baseline", "quickstart_distill")
    ]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
        assert r.exitcode == 0
    names = recorded(out)
    assert sorted(names) == sorted(f"{c}__seed-{s}" for c in ("quickstart_baseline", "quickstart_distill")
                                   for s in seeds)  # fmt: skip
    # each runner's records stay in its plan order
    for config in ("quickstart_baseline", "quickstart_distill"):
        assert [n for n in names if n.startswith(config)] == [f"{config}__seed-{s}" for s in seeds]


# ---------------------------------------------------------------------- (c) what a row over seeds pools
@pytest.fixture
def leftover_beside_seeds(tmp_path: Path) -> list[RunRecord]:
    """A teacher (0.9); `base` left by an earlier invocation without seeds (0.2, other settings); `base` and
    `dist` over seeds 0, 1, 2 (0.5, 0.6, 0.7 and 0.56, 0.68, 0.75). The leftover comes first, as an earlier
    invocation's record does in experiment_runs.json."""
    runs = tmp_path / "runs"
    teacher = fabricate_run(runs, "teacher", B3, [0.9])
    ckpt = teacher / "checkpoints" / "best_model.pth"
    records = [
        RunRecord("teacher", teacher, "completed", group="teacher"),
        RunRecord("base", fabricate_run(runs, "base", B0, [0.2]), "completed", group="base"),
    ]
    for seed, base, dist in ((0, 0.5, 0.56), (1, 0.6, 0.68), (2, 0.7, 0.75)):
        b = fabricate_run(runs, f"base__seed-{seed}", B0, [base])
        d = fabricate_run(runs, f"dist__seed-{seed}", B0, [dist], teacher_checkpoint=ckpt)
        records += [RunRecord(b.name, b, "completed", seed=seed, group="base"),
                    RunRecord(d.name, d, "completed", seed=seed, group="dist")]  # fmt: skip
    return records


def test_a_run_without_a_seed_is_not_pooled_with_its_configs_seed_runs(leftover_beside_seeds):
    records = leftover_beside_seeds
    table = {r["experiment"]: r for r in aggregate_rows(collect_rows(records), records)}
    assert list(table) == ["teacher", "base (no seed)", "base", "dist"]
    assert table["base"]["n"] == 3 and table["base"]["seeds"] == "0 1 2"
    assert table["base"]["target_iou_mean"] == pytest.approx(0.6)
    leftover = table["base (no seed)"]
    assert leftover["n"] == 1 and leftover["target_iou_mean"] == pytest.approx(0.2)
    # the distilled config is paired with the seed runs of its baseline, not with the leftover
    assert table["dist"]["baseline"] == "base" and table["dist"]["delta_n"] == 3
    assert table["dist"]["gap_closed"] is not None


def test_the_report_says_which_runs_each_row_pools_and_which_it_left_out(leftover_beside_seeds, tmp_path):
    records = leftover_beside_seeds
    paths = write_report(collect_rows(records), tmp_path / "report", records)
    md = paths["markdown"].read_text()
    assert "Runs pooled per row" in md
    assert "base: base__seed-0, base__seed-1, base__seed-2" in md
    assert "Left out of a seed group: base (its own row, base (no seed)): recorded without a seed" in md
    assert "| base (no seed) " in md
    runs_csv = paths["runs_csv"].read_text().splitlines()
    assert any(line.startswith("base,base (no seed),") for line in runs_csv)
