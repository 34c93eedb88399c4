"""The GPU acceptance check (`python -m benchmarks --suite gpu`, benchmarks/gpu.py): its CPU smoke run end to
end in a subprocess (once), and the pass/fail, JSON and table logic, the log parsers and the GPU-busy loop
with stand-ins."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks.gpu import CheckFailed, Item, Outcome, Skip, exit_code, overall_ok, report, run_items, table
from benchmarks.gpu_items import items_for, pick_visible, process_group_evidence, runner_header

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the CPU smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_acceptance")
    out, json_path = tmp / "work", tmp / "result" / "acceptance.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--suite", "gpu", "--device", "cpu", "--out", str(out),
         "--json", str(json_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert json_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(json_path.read_text()), out


def test_the_cpu_smoke_run_passes_every_item_that_applies_and_exits_0(smoke):
    proc, result, out = smoke
    failed = {i["name"]: i["error"] for i in result["items"] if i["status"] == "failed"}
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["ok"] is True and result["finished"] is True and result["device"] == "cpu"
    assert result["out_dir"] == str(out.resolve())
    assert [i["name"] for i in result["items"]] == [i.name for i in items_for("cpu")]
    for item in result["items"]:
        assert set(item) >= {"name", "status", "ok", "figure", "seconds", "error", "values"}
        assert item["seconds"] >= 0
        if item["status"] == "skipped":  # only what needs CUDA by nature, and it says so
            assert item["expected_skip"] and "needs CUDA" in item["note"], item
            assert item["ok"] is None
        else:
            assert item["status"] == "passed" and item["ok"] is True and item["error"] is None, item
            assert item["figure"], item
    skipped = {i["name"] for i in result["items"] if i["status"] == "skipped"}
    assert skipped == {"kd_compile", "runner_visible_devices"}
    assert result["counts"] == {"passed": len(result["items"]) - 2, "failed": 0, "skipped": 2}


def test_the_smoke_run_checked_real_outputs(smoke):
    _, result, out = smoke
    items = {i["name"]: i for i in result["items"]}
    quick = items["quickstart"]["values"]
    for key in ("pytorch", "onnx", "int8"):
        assert 0.0 <= quick[key] <= 1.0, quick
    assert abs(quick["onnx"] - quick["pytorch"]) <= 0.02
    assert (Path(quick["run_dir"]) / "checkpoints" / "best_model.onnx.json").is_file()
    assert Path(quick["run_dir"]).is_relative_to(out.resolve())  # nothing in the repository's experiments/
    fp16 = items["kd_fp16_scaler"]["values"]
    assert fp16["scale_after_overflow"] < fp16["scale_before_overflow"]
    assert all(math.isfinite(x) for x in fp16["losses"])
    torchrun = items["torchrun"]["values"]
    assert torchrun["backend"] == "gloo" and "gloo" in torchrun["evidence"]
    slots = {v["where"] for v in items["runner_gpus"]["values"].values()}
    assert slots == {"cpu#0", "cpu#1"}
    assert items["predict_pth"]["values"]["rois"] > 0
    assert (out / "predict" / "predictions.json").is_file()
    assert items["throughput"]["values"]["speedup_vs_naive"] > 0


def test_the_smoke_run_prints_the_table(smoke):
    proc, result, _ = smoke
    assert "| item" in proc.stdout and "| seconds |" in proc.stdout
    for item in result["items"]:
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {item['name']} "))
        assert ("pass" if item["status"] == "passed" else "skip") in row
    assert "PASSED:" in proc.stdout


# ------------------------------------------------------------------------------------ pass/fail logic
def _items(calls: list[str]) -> list[Item]:
    def ok(name: str, figure: str):
        def run(ctx):
            calls.append(name)
            return Outcome(figure, {"x": 1.5, "nan": float("nan")})

        return run

    def boom(ctx):
        calls.append("boom")
        raise RuntimeError("boom at step 3")

    def missed(ctx):
        calls.append("missed")
        raise CheckFailed(
            "goal missed: 2.1 < 3", tail="child said this", figure="2.1x", values={"speedup": 2.1}
        )

    def cuda_only(ctx):
        raise Skip("needs CUDA")

    return [
        Item("first", "passes", ok("first", "1.5 s")),
        Item("broken", "raises", boom),
        Item("after_broken", "needs the broken one", ok("after_broken", "-"), needs=("broken",)),
        Item("after_first", "needs the first one", ok("after_first", "fine"), needs=("first",)),
        Item("goal", "misses its goal", missed),
        Item("cuda", "needs CUDA", cuda_only),
        Item("last", "still runs", ok("last", "done")),
    ]


def test_a_raising_item_is_failed_with_its_error_and_every_other_item_still_runs():
    calls: list[str] = []
    seen: list[str] = []
    results = run_items(_items(calls), ctx=None, on_result=lambda r: seen.append(r.name))
    by = {r.name: r for r in results}
    assert calls == ["first", "boom", "after_first", "missed", "last"]
    assert seen == [r.name for r in results]
    assert by["first"].status == "passed" and by["first"].figure == "1.5 s"
    assert by["broken"].status == "failed" and by["broken"].ok is False
    assert by["broken"].error.startswith("RuntimeError: boom at step 3")
    assert "traceback" in by["broken"].error and "in boom" in by["broken"].error
    assert by["after_broken"].status == "skipped" and "broken (failed)" in by["after_broken"].error
    assert not by["after_broken"].expected_skip
    assert by["after_first"].status == "passed"
    goal = by["goal"]  # a missed goal keeps its figures
    assert goal.status == "failed" and goal.figure == "2.1x" and goal.values == {"speedup": 2.1}
    assert goal.error.startswith("goal missed: 2.1 < 3") and "child said this" in goal.error
    assert (
        by["cuda"].status == "skipped"
        and by["cuda"].expected_skip
        and by["cuda"].note == "skipped: needs CUDA"
    )
    assert by["last"].status == "passed"
    assert not overall_ok(results) and exit_code(results) == 1


def test_the_report_is_strict_json_and_the_table_shows_why():
    results = run_items(_items([]), ctx=None)
    data = report(results, {"device": "cpu"})
    text = json.dumps(data, allow_nan=False)  # NaN would be invalid JSON
    assert data["ok"] is False and data["counts"] == {"passed": 3, "failed": 2, "skipped": 2}
    assert json.loads(text)["items"][0]["values"] == {"x": 1.5, "nan": None}
    rows = {line.split("|")[1].strip(): line for line in table(results).splitlines()[2:]}
    assert list(rows) == [r.name for r in results]
    assert "FAIL" in rows["broken"] and "RuntimeError: boom at step 3" in rows["broken"]
    assert "2.1x; goal missed" in rows["goal"]
    assert "skip" in rows["after_broken"] and "needs broken (failed)" in rows["after_broken"]
    assert "pass" in rows["first"] and "1.5 s" in rows["first"]


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ([("passed", False), ("skipped", True)], 0),  # a skip by design for the device is fine
        ([("passed", False), ("skipped", False)], 1),  # any other skip is not
        ([("passed", False), ("failed", False)], 1),
        ([("skipped", True)], 1),  # nothing ran
    ],
)
def test_exit_code(statuses, code):
    results = [gpu.ItemResult(f"i{n}", "", s, 0.0, expected_skip=e) for n, (s, e) in enumerate(statuses)]
    assert exit_code(results) == code


def test_run_acceptance_writes_the_json_after_every_item_and_exits_1_on_a_failure(
    tmp_path, monkeypatch, capsys
):
    import benchmarks.gpu_items as items_module

    snapshots: list[dict] = []
    json_path = tmp_path / "r.json"

    def second(ctx):
        snapshots.append(json.loads(json_path.read_text()))  # written after the first item
        raise CheckFailed("second broke")

    fake = [Item("one", "a", lambda ctx: Outcome("fig one")), Item("two", "b", second)]
    monkeypatch.setattr(items_module, "items_for", lambda device: fake)
    assert gpu.run_acceptance("cpu", tmp_path / "work", json_path) == 1
    assert snapshots[0]["finished"] is False and [i["name"] for i in snapshots[0]["items"]] == ["one"]
    final = json.loads(json_path.read_text())
    assert final["finished"] is True and final["ok"] is False
    assert [(i["name"], i["status"]) for i in final["items"]] == [("one", "passed"), ("two", "failed")]
    printed = capsys.readouterr().out
    assert "| one " in printed and "FAILED: 1 passed, 1 failed" in printed
    assert gpu.run_acceptance("cpu", tmp_path / "work", json_path, only=["nope"]) == 2


# ------------------------------------------------------------------------------------ log parsers
@pytest.mark.parametrize(
    ("text", "backend", "world", "found"),
    [
        ("12:00:01 INFO DDP: rank 0 of 1 (nccl)", "nccl", 1, True),
        (
            "node:77:77 [0] NCCL INFO comm 0x55 rank 0 nranks 1 cudaDev 0 busId 1b000 - Init COMPLETE",
            "nccl",
            1,
            True,
        ),
        ("process group: backend=gloo, rank=0, world_size=2", "gloo", 2, True),
        ("node:77:77 [0] NCCL INFO Bootstrap : Using eth0:10.0.0.2", "nccl", 1, False),  # no rank, no size
        ("12:00:01 INFO DDP: rank 0 of 2 (nccl)", "nccl", 1, False),  # another world size
        ("12:00:01 INFO DDP: rank 0 of 1 (gloo)", "nccl", 1, False),  # another backend
        ("12:00:01 INFO DDP: rank 10 of 1 (nccl)", "nccl", 1, False),
        ("training quickstart_baseline on 1 device, nccl not used", "nccl", 1, False),
    ],
)
def test_process_group_evidence(text, backend, world, found):
    assert (process_group_evidence("noise\n" + text + "\nmore", backend, world) is not None) is found


def test_runner_header(tmp_path):
    log = tmp_path / "stdout.txt"
    log.write_text("# kdlab runner: run__seed-1 on cuda:1 (CUDA_VISIBLE_DEVICES=GPU-ab12) at 17.5\nnext\n")
    assert runner_header(log) == {"run": "run__seed-1", "where": "cuda:1", "cvd": "GPU-ab12"}
    log.write_text("# kdlab runner: r on cpu#0 (1 thr) at 3.0\n")
    assert runner_header(log) == {"run": "r", "where": "cpu#0", "cvd": None}
    log.write_text("12:00 INFO something else\n")
    with pytest.raises(CheckFailed, match="not the runner's header"):
        runner_header(log)
    with pytest.raises(CheckFailed, match="missing or empty"):
        runner_header(tmp_path / "absent.txt")


@pytest.mark.parametrize(
    ("env", "count", "uuids", "expected"),
    [
        ({}, 4, [], "3"),  # the last GPU
        ({"CUDA_VISIBLE_DEVICES": "2, 5"}, 2, [], "5"),  # the last of this process's own mask
        ({"CUDA_VISIBLE_DEVICES": "GPU-x"}, 1, [], "GPU-x"),
        ({}, 1, ["GPU-1234-abcd"], "GPU-1234-abcd"),  # a single GPU by its UUID
        ({}, 1, [], "0"),
    ],
)
def test_pick_visible(env, count, uuids, expected):
    visible, note = pick_visible(env, count, uuids)
    assert visible == expected and note
    assert ("wrong mapping may go unseen" in note) == (count == 1)


# ------------------------------------------------------------------------------------ the GPU-busy loop
def test_fed_busy_fraction_runs_a_warm_and_a_measured_epoch_of_the_real_loader(tmp_path, monkeypatch):
    """On CPU with a stand-in for the profiler measurement: the measured callable trains on every batch of
    one epoch, the first batch included though fetched before the measured region."""
    import benchmarks.data
    import benchmarks.kd
    from benchmarks.common import B0, BenchSettings
    from benchmarks.gpu_items import fed_busy_fraction

    seen: list[int] = []

    def fake_busy(run):
        before = steps_taken()
        run()
        seen.append(steps_taken() - before)
        return 0.5

    trainers: list = []
    original = benchmarks.kd.ProjectSteps.__init__

    def spy_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        trainers.append(self.kd_trainer)

    def steps_taken() -> int:
        return trainers[0].state.global_step

    monkeypatch.setattr(benchmarks.data, "gpu_busy_fraction", fake_busy)
    monkeypatch.setattr(benchmarks.kd.ProjectSteps, "__init__", spy_init)
    s = BenchSettings(
        device="cpu", batch_size=2, size=(64, 64), teacher_encoder=B0, workers=(0,), data_images=4
    )
    assert fed_busy_fraction(s, tmp_path) == 0.5
    assert seen == [2]  # 4 images, batch 2: both batches of the measured epoch trained
    assert steps_taken() == 4  # and the warm epoch's two before it
