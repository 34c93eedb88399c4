"""run_experiments.py and run_distillation_training.sh on tiny CPU runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.errors import ConfigError
from kdlab.experiments.plan import expand_configs, parse_sweeps, plan_runs
from tests.helpers import assert_same_weights, error_lines, tree_hashes

ROOT = Path(__file__).resolve().parents[1]

TINY_SET = [
    "data.synthetic.train_images=8", "data.synthetic.val_images=4", "data.synthetic.test_images=4",
    "data.synthetic.image_size=64,64", "data.input_size=64,64", "data.num_workers=0", "model.roi_size=16,12",
    "model.mask_size=32,24", "model.head_channels=16", "training.num_vis_images=1", "training.log_every_steps=1",
    # the runner's children export in their own process, where conftest's patches do not reach: TorchScript
    # (2 s, dynamo takes ~25 s) and one timed latency run
    "export.exporter=torchscript", "export.latency_runs=1",
]  # fmt: skip


def tiny_set(tmp: Path) -> list[str]:
    return [f"data.synthetic.root={tmp / 'data'}", *TINY_SET]


def test_suites_expand_and_teachers_run_first():
    assert expand_configs(["quickstart"]) == [
        "quickstart_teacher",
        "quickstart_baseline",
        "quickstart_distill",
    ]
    assert expand_configs(["quickstart_fast"])[-1] == "quickstart_fast_distill"
    order = [
        p.run_name
        for p in plan_runs(["quickstart_distill", "quickstart_baseline", "quickstart_teacher"], [], {}, [])
    ]
    assert order.index("quickstart_teacher") < order.index("quickstart_distill")


def test_the_quickstart_suite_brings_its_seeds_and_parallelism_unless_the_command_gives_them():
    import argparse

    from kdlab.cli.experiments import apply_suite_defaults
    from kdlab.experiments.plan import SUITE_DEFAULTS

    def applied(configs: list[str], **given) -> argparse.Namespace:
        args = argparse.Namespace(configs=configs, seed=None, seeds=None, parallel=None, gpus=None,
                                  executor="local")  # fmt: skip
        vars(args).update(given)
        apply_suite_defaults(args)
        return args

    seeds, parallel = SUITE_DEFAULTS["quickstart"]["seeds"], SUITE_DEFAULTS["quickstart"]["parallel"]
    assert len(seeds) >= 3 and parallel >= 2  # the main job resolves distillation's effect over seeds
    args = applied(["quickstart"])
    assert (args.seeds, args.parallel) == (seeds, parallel)
    args = applied(["quickstart"], seed=7)  # one run, as asked
    assert (args.seeds, args.seed, args.parallel) == (None, 7, parallel)
    assert applied(["quickstart"], seeds=[5]).seeds == [5]
    assert applied(["quickstart"], parallel=1).parallel == 1
    assert applied(["quickstart"], gpus="all").parallel is None
    assert applied(["quickstart"], executor="slurm").parallel is None
    args = applied(["quickstart", "digits"])  # not the one suite alone: nothing added
    assert (args.seeds, args.parallel) == (None, None)
    assert applied(["quickstart_baseline"]).seeds is None
    # the planned runs: the teacher once, each student once per seed
    planned = plan_runs(["quickstart"], [], {}, [], seeds=seeds)
    names = [p.run_name for p in planned]
    assert names.count("quickstart_teacher") == 1
    assert {f"quickstart_distill__seed-{s}" for s in seeds} <= set(names)


def test_sweeps_expand_into_named_runs_and_check_keys():
    assert parse_sweeps(["training.lr=0.1,0.2", "model.encoder=a,b"]) == [
        [("training.lr", "0.1"), ("model.encoder", "a")],
        [("training.lr", "0.1"), ("model.encoder", "b")],
        [("training.lr", "0.2"), ("model.encoder", "a")],
        [("training.lr", "0.2"), ("model.encoder", "b")],
    ]
    planned = plan_runs(["quickstart_baseline"], [], {}, ["training.lr=0.1,0.2"])
    assert [p.run_name for p in planned] == ["quickstart_baseline__lr-0.1", "quickstart_baseline__lr-0.2"]
    assert [p.config.training.lr for p in planned] == [0.1, 0.2]
    with pytest.raises(ConfigError, match="training.lr"):
        parse_sweeps(["training.lrr=0.1,0.2"])


@pytest.fixture(scope="module")
def quickstart_suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    out = tmp / "runs"
    code = run_cli(
        experiments_main,
        ["--configs", "quickstart", "--epochs", "1", "--batch_size", "4", "--device", "cpu", "--seed", "0",
         "--output_dir", str(out), "--set", *tiny_set(tmp)],
    )  # fmt: skip
    return code, out


def test_quickstart_suite_trains_exports_and_reports(quickstart_suite):
    code, out = quickstart_suite
    assert code == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    names = ["quickstart_teacher", "quickstart_baseline", "quickstart_distill"]
    assert [r["name"] for r in runs] == names
    assert all(r["status"] == "completed" and r["exit_code"] == 0 for r in runs)
    for distill in runs[2:]:  # the student learns from the teacher trained in the same invocation
        assert "--teacher_checkpoint" in distill["command"]
        assert distill["command"][distill["command"].index("--teacher_checkpoint") + 1].endswith(
            "quickstart_teacher/checkpoints/best_model.pth"
        )
    for r in runs:
        run = Path(r["run_dir"])
        child_log = (run / "logs" / "stdout.txt").read_text()
        assert "epoch 1/1" in child_log
        assert (
            "ONNX accuracy" not in child_log
        )  # the child's export scores without progress bars (--no_progress)
        assert (run / "checkpoints" / "best_model.onnx").is_file()
        assert r["export"]["ok"]
        # exported and scored by the process that trained the run, on its device (issue 26, item 9)
        assert "--export_onnx" in r["command"]
        assert json.loads((run / "summary.json").read_text())["export"] == r["export"]
        assert r["export"]["scored_on"] == "cpu"
    for name in ("experiment_comparison.csv", "experiment_comparison.md", "experiment_comparison.png",
                 "training_curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    # the table's latency: every exported file timed in one interleaved run, not each export's own figure
    latency = json.loads((out / "report_latency.json").read_text())
    assert latency["interleaved"] and set(latency["ms_per_image_median"]) == set(names)
    table = {r["experiment"]: r for r in csv.DictReader((out / "experiment_comparison.csv").open())}
    for name, ms in latency["ms_per_image_median"].items():
        assert float(table[name]["onnx_latency_ms"]) == pytest.approx(ms, rel=1e-4)
    md = (out / "experiment_comparison.md").read_text()
    assert all(word in md for word in ("quickstart_distill", "distilled", "teacher"))
    # selected on val, reported on the test split; the run recorded the test pass
    summary = json.loads((out / "quickstart_distill" / "summary.json").read_text())
    assert summary["test"]["selected_on"] == "val" and summary["test_metrics"]["images"] == 4
    assert table["quickstart_distill"]["split"] == "test" and "held-out test split" in md


def test_export_only_on_existing_runs_does_not_train(quickstart_suite, tmp_path, capsys):
    _, out = quickstart_suite
    onnx = out / "quickstart_baseline" / "checkpoints" / "best_model.onnx"
    last = out / "quickstart_baseline" / "checkpoints" / "last.pth"
    onnx.unlink()
    before = last.stat().st_mtime_ns
    code = run_cli(
        experiments_main,
        ["--configs", "quickstart_baseline", "--export_onnx", "--skip_training", "--output_dir", str(out),
         "--set", *tiny_set(tmp_path)],
    )  # fmt: skip
    assert code == 0
    assert onnx.is_file() and last.stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert "| quickstart_baseline" in printed  # the comparison table is printed at the end
    # The export-only pass on one config keeps the other runs in the records and the table.
    runs = {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}
    assert (
        runs["quickstart_baseline"]["status"] == "completed" and runs["quickstart_baseline"]["export"]["ok"]
    )
    assert "quickstart_distill" in runs and "quickstart_distill" in printed


def _write_config(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def failing_configs(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("quickstart_teacher", "quickstart_baseline", "people_b3_teacher"):
        (configs / f"{name}.py").write_text((ROOT / "configs" / f"{name}.py").read_text())
    _write_config(configs, "broken_teacher", """
        BASE = "quickstart_teacher"
        CONFIG = {"model": {"encoder": "timm-efficientnet-b0"}, "data": {"val_images": "/definitely/missing"}}
    """)  # fmt: skip
    _write_config(configs, "student_of_broken", """
        BASE = "quickstart_baseline"
        CONFIG = {"distillation": {"enabled": True, "teacher_experiment": "broken_teacher"}}
    """)  # fmt: skip
    monkeypatch.setenv("KDLAB_CONFIGS_DIR", str(configs))
    return tmp_path


def test_a_failed_experiment_is_recorded_and_the_others_still_run(failing_configs):
    tmp = failing_configs
    out = tmp / "runs"
    code = run_cli(
        experiments_main,
        ["--configs", "broken_teacher", "student_of_broken", "quickstart_baseline", "--epochs", "1",
         "--batch_size", "4", "--output_dir", str(out), "--no_export", "--set", *tiny_set(tmp)],
    )  # fmt: skip
    assert code == 1
    runs = {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}
    assert runs["broken_teacher"]["status"] == "failed" and runs["broken_teacher"]["exit_code"] == 2
    assert "/definitely/missing" in runs["broken_teacher"]["error_tail"]
    assert runs["student_of_broken"]["status"] == "skipped"
    assert runs["quickstart_baseline"]["status"] == "completed"
    md = (out / "experiment_comparison.md").read_text()
    assert "broken_teacher" in md and "failed" in md


def test_fail_fast_stops_at_the_first_failure(failing_configs):
    tmp = failing_configs
    out = tmp / "runs"
    code = run_cli(
        experiments_main,
        ["--configs", "broken_teacher", "quickstart_baseline", "--epochs", "1", "--output_dir", str(out),
         "--no_export", "--fail_fast", "--set", *tiny_set(tmp)],
    )  # fmt: skip
    assert code == 1
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [r["name"] for r in runs] == ["broken_teacher"]


WRAPPER = ROOT / "run_distillation_training.sh"


@pytest.fixture
def stub_python(tmp_path):
    """A stand-in interpreter for the wrapper (via KDLAB_PYTHON): it records its argv as JSON and exits with
    $STUB_EXIT, so the wrapper is tested without training anything. Returns (env, argv file)."""
    record = tmp_path / "stub argv.json"
    stub = tmp_path / "stub_python"
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open(os.environ["STUB_RECORD"], "w") as fh:
            json.dump(sys.argv[1:], fh)
        sys.exit(int(os.environ["STUB_EXIT"]))
    """))  # fmt: skip
    stub.chmod(0o755)
    env = dict(os.environ, KDLAB_PYTHON=str(stub), STUB_RECORD=str(record), STUB_EXIT="0")
    return env, record


def _wrapper(env: dict[str, str], *args: str, exit_code: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([str(WRAPPER), *args], env={**env, "STUB_EXIT": str(exit_code)}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_shell_wrapper_passes_every_argument_intact_to_train_advanced(stub_python, tmp_path):
    from kdlab.cli.train import build_parser

    env, record = stub_python
    spaced = tmp_path / "dir with spaces"
    teacher, out = spaced / "my teacher.pth", spaced / "runs out"
    sets = [f"data.synthetic.root={spaced / 'data'}", "training.lr=2e-4"]
    proc = _wrapper(env, "--teacher_checkpoint", str(teacher), "--config", "quickstart_distill", "--epochs", "1",
                    "--temperature", "3", "--alpha", "0.6", "--batch_size", "4", "--resume", "auto", "--",
                    "--output_dir", str(out), "--no_progress", "--set", *sets)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    assert argv == [
        str(ROOT / "train_advanced.py"), "--config", "quickstart_distill",
        "--teacher_checkpoint", str(teacher), "--epochs", "1", "--distillation_temperature", "3",
        "--distillation_alpha", "0.6", "--batch_size", "4", "--resume", "auto",
        "--output_dir", str(out), "--no_progress", "--set", *sets,
    ]  # fmt: skip
    parsed = build_parser().parse_args(argv[1:])  # what train_advanced.py makes of them
    assert parsed.config == "quickstart_distill" and parsed.teacher_checkpoint == str(teacher)
    assert parsed.output_dir == str(out) and parsed.set_items == sets
    assert parsed.distillation_temperature == 3.0 and parsed.distillation_alpha == 0.6
    assert parsed.epochs == 1 and parsed.batch_size == 4
    assert parsed.resume == "auto" and parsed.no_progress
    _wrapper(env, "--epochs", "2")
    assert json.loads(record.read_text()) == [str(ROOT / "train_advanced.py"), "--config", "people_b0_from_b3",
                                              "--epochs", "2"]  # fmt: skip


@pytest.mark.parametrize("code", [0, 1, 7, 130, 143])
def test_shell_wrapper_exits_with_the_trainings_own_status(stub_python, code):
    """7 and 143 are not the wrapper's own error code (2): they can only come from the interpreter."""
    env, record = stub_python
    proc = _wrapper(env, "--epochs", "1", exit_code=code)
    assert proc.returncode == code, proc.stderr
    assert record.is_file()  # the stub ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs"], "--epochs needs a value"),
        (["--alpha", "--epochs", "3"], "--alpha needs a value"),
        (["--epoch", "3"], "unknown option '--epoch'"),
    ],
)
def test_shell_wrapper_refuses_bad_options_itself_with_exit_2(stub_python, args, message):
    env, record = stub_python
    proc = _wrapper(env, *args, exit_code=7)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not record.exists()  # training never started
    help_proc = _wrapper(env, "--help", exit_code=7)
    assert help_proc.returncode == 0 and "usage: ./run_distillation_training.sh" in help_proc.stdout
    assert not record.exists()


def test_a_sweep_varies_the_students_and_runs_their_teacher_once():
    planned = plan_runs(["digits"], [], {}, ["model.name=resnet10t,test_efficientnet"])
    assert [p.run_name for p in planned] == [
        "digits_teacher",
        "digits_student_baseline__name-resnet10t",
        "digits_student_baseline__name-test_efficientnet",
        "digits_student_distill__name-resnet10t",
        "digits_student_distill__name-test_efficientnet",
    ]
    assert planned[0].config.model.name == "resnet18"
    assert [p.depends_on for p in planned[3:]] == ["digits_teacher", "digits_teacher"]


def test_report_keeps_earlier_runs_of_the_same_task_only():
    """`--configs digits` then `--configs quickstart` in one output dir: the people table must not list the
    classifiers (their metrics have other columns), while experiment_runs.json keeps both."""
    from kdlab.experiments.orchestrate import same_task_runs
    from kdlab.experiments.runner import RunResult

    def result(name, task):
        config = {"task": task} if task else {}
        return RunResult(name, name, f"/runs/{name}", "completed", 0, 1.0, [], "", config)

    earlier = [result("digits_teacher", "classification"), result("old_people", None)]
    now = [result("quickstart_teacher", "segmentation")]
    assert [r.name for r in same_task_runs(earlier + now, now)] == ["old_people", "quickstart_teacher"]
    assert [r.name for r in same_task_runs(earlier + now, earlier[:1])] == ["digits_teacher"]


# ------------------------------------------------------------------------------------------- seeds
DIGITS_TINY = [
    "data.classification.image_size=16", "data.classification.max_train_samples=64",
    "data.classification.val_fraction=0.1", "training.log_every_steps=1",
]  # fmt: skip


def digits_args(out: Path, *extra: str) -> list[str]:
    return ["--epochs", "1", "--batch_size", "32", "--device", "cpu", "--output_dir", str(out), "--no_export",
            "--set", *DIGITS_TINY, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def digits_two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "runs"
    # Two at a time: the seed tests below also hold for the parallel runner (test_runner_parallel.py checks
    # the order and the overlap on this same suite).
    code = run_cli(
        experiments_main, ["--configs", "digits", "--seeds", "3", "4", "--parallel", "2", *digits_args(out)]
    )
    return code, out


def test_seeds_run_each_student_per_seed_and_the_teacher_once(digits_two_seeds):
    code, out = digits_two_seeds
    assert code == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [r["name"] for r in runs] == [
        "digits_teacher",
        "digits_student_baseline__seed-3", "digits_student_baseline__seed-4",
        "digits_student_distill__seed-3", "digits_student_distill__seed-4",
    ]  # fmt: skip
    assert all(r["status"] == "completed" for r in runs)
    assert [r["seed"] for r in runs] == [None, 3, 4, 3, 4]
    teacher_best = str(out / "digits_teacher" / "checkpoints" / "best_model.pth")
    for r in runs[3:]:
        assert r["command"][r["command"].index("--teacher_checkpoint") + 1] == teacher_best
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("digits_teacher")) == ["digits_teacher"]
    for r in runs[1:]:
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert config["training"]["seed"] == r["seed"] and config["name"] == r["name"]


def test_paired_students_start_from_identical_weights_and_seeds_differ(digits_two_seeds):
    _, out = digits_two_seeds

    def untrained(name: str) -> Path:
        return out / name / "checkpoints" / "untrained_model.pth"

    for seed in (3, 4):
        assert_same_weights(
            untrained(f"digits_student_baseline__seed-{seed}"),
            untrained(f"digits_student_distill__seed-{seed}"),
        )
    with pytest.raises(AssertionError):
        assert_same_weights(
            untrained("digits_student_baseline__seed-3"), untrained("digits_student_baseline__seed-4")
        )


def test_the_seed_report_has_one_row_per_config_with_the_paired_difference(digits_two_seeds):
    import pandas as pd

    _, out = digits_two_seeds
    frame = pd.read_json(out / "experiment_comparison.json").set_index("experiment")
    assert list(frame.index) == ["digits_teacher", "digits_student_baseline", "digits_student_distill"]
    assert list(frame["n"]) == [1, 2, 2]
    distill = frame.loc["digits_student_distill"]
    assert distill["baseline"] == "digits_student_baseline" and distill["delta_n"] == 2
    runs = pd.read_csv(out / "experiment_comparison_runs.csv").set_index("experiment")
    paired = [runs.loc[f"digits_student_distill__seed-{s}", "top1"] - runs.loc[f"digits_student_baseline__seed-{s}",
              "top1"] for s in (3, 4)]  # fmt: skip
    assert distill["delta_mean"] == pytest.approx(sum(paired) / 2, abs=1e-5)
    assert distill["verdict"] in ("gain", "hurts", "inconclusive", "inconclusive (zero spread)") or distill[
        "verdict"
    ].startswith("equivalent within ±")
    md = (out / "experiment_comparison.md").read_text()
    assert " ± " in md and "Student t" in md and distill["verdict"] in md


def test_skip_training_reports_every_seed_run_and_prints_where_the_files_are(digits_two_seeds, capsys):
    _, out = digits_two_seeds
    before = tree_hashes(out / "digits_student_distill__seed-3" / "checkpoints")
    code = run_cli(experiments_main, ["--configs", "digits", "--seeds", "3", "4", "--skip_training",
                                      *digits_args(out)])  # fmt: skip
    assert code == 0
    assert tree_hashes(out / "digits_student_distill__seed-3" / "checkpoints") == before
    printed = capsys.readouterr().out
    assert f"{out / 'experiment_runs.json'}" in printed and f"{out / 'experiment_comparison.csv'}" in printed
    assert "| digits_student_distill " in printed


def test_total_epochs_and_resume_path_continue_seed_runs(digits_two_seeds):
    _, out = digits_two_seeds
    args = ["--configs", "digits_student_baseline", "--seeds", "3", "4", "--total_epochs", "2"]
    assert run_cli(experiments_main, [*args, *digits_args(out)[2:]]) == 0
    for seed in (3, 4):
        rows = (
            (out / f"digits_student_baseline__seed-{seed}" / "logs" / "metrics.csv").read_text().splitlines()
        )
        assert [line.split(",")[0] for line in rows[1:]] == ["1", "2"]
    run = out / "digits_student_baseline__seed-3"
    epoch1 = run / "checkpoints" / "checkpoint_epoch_0001.pth"
    extended = out.parent / "extended_last.pth"
    shutil.copy(run / "checkpoints" / "last.pth", extended)
    args = [
        "--configs",
        "digits_student_baseline",
        "--seeds",
        "3",
        "--resume",
        str(epoch1),
        "--total_epochs",
        "2",
    ]
    assert run_cli(experiments_main, [*args, *digits_args(out)[2:]]) == 0
    runs = {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}
    command = runs["digits_student_baseline__seed-3"]["command"]
    assert command[command.index("--resume") + 1] == str(epoch1)
    log_text = (run / "logs" / "stdout.txt").read_text()
    assert f"resumed from {epoch1} at epoch 1" in log_text
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rows[1:]] == ["1", "2"]
    # Continuing from the epoch-1 checkpoint retrains epoch 2 exactly as continuing from last.pth did.
    assert_same_weights(extended, run / "checkpoints" / "last.pth")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "1", "2", "1"], "--seeds lists 1 more than once"),
        (["--seeds", "1", "x"], "invalid int value: 'x'"),
        (["--seeds", "1", "--seed", "3"], "either --seed or --seeds"),
        (["--seed_teachers"], "--seed_teachers needs --seeds"),
        (["--resume", "/no/such/checkpoint_epoch_0025.pth"], "3 runs are planned"),
        (["--seeds", "1", "--resume", "/no/such/checkpoint_epoch_0025.pth"], "3 runs are planned"),
    ],
)
def test_bad_seed_and_resume_flags_are_one_error_line_and_touch_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    code = run_cli(experiments_main, ["--configs", "digits", *extra, *digits_args(out)])
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_resume_path_that_does_not_exist_is_bad_input(tmp_path, capsys):
    out = tmp_path / "runs"
    missing = tmp_path / "nope" / "checkpoints" / "checkpoint_epoch_0025.pth"
    code = run_cli(
        experiments_main, ["--configs", "digits_teacher", "--resume", str(missing), *digits_args(out)]
    )
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0]
    assert not out.exists()


def test_seed_teachers_pair_each_student_seed_with_its_teacher_seed():
    planned = plan_runs(["digits"], [], {}, [], seeds=[1, 2], seed_teachers=True)
    assert [p.run_name for p in planned] == [
        "digits_teacher__seed-1", "digits_teacher__seed-2",
        "digits_student_baseline__seed-1", "digits_student_baseline__seed-2",
        "digits_student_distill__seed-1", "digits_student_distill__seed-2",
    ]  # fmt: skip
    assert [p.depends_on for p in planned[4:]] == ["digits_teacher__seed-1", "digits_teacher__seed-2"]
    assert [p.config.distillation.teacher_experiment for p in planned[4:]] == [
        p.depends_on for p in planned[4:]
    ]
    assert [p.config.training.seed for p in planned] == [1, 2] * 3


def test_seeds_and_sweeps_give_one_run_per_value_and_seed():
    planned = plan_runs(["digits"], [], {}, ["model.name=resnet10t,test_efficientnet"], seeds=[7, 8])
    names = [p.run_name for p in planned]
    assert names[0] == "digits_teacher" and len(names) == 9
    assert "digits_student_distill__name-test_efficientnet__seed-8" in names
    run = planned[names.index("digits_student_distill__name-test_efficientnet__seed-8")]
    assert (run.config.model.name, run.config.training.seed, run.group) == (
        "test_efficientnet",
        8,
        "digits_student_distill__name-test_efficientnet",
    )


def test_fail_fast_stops_at_the_first_failed_seed(failing_configs):
    tmp = failing_configs
    out = tmp / "runs"
    code = run_cli(
        experiments_main,
        ["--configs", "broken_teacher", "quickstart_baseline", "--seeds", "1", "2", "--epochs", "1",
         "--output_dir", str(out), "--no_export", "--fail_fast", "--set", *tiny_set(tmp)],
    )  # fmt: skip
    assert code == 1
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [(r["name"], r["status"]) for r in runs] == [("broken_teacher__seed-1", "failed")]


# ------------------------------------------------------------------------------------------- aliases
ALIASES = {
    "baseline": "people_b0_baseline",
    "rgb_hierarchical_unet_v2_distillation_b0_from_b3": "people_b0_from_b3",
    "rgb_hierarchical_unet_v2_fullimage_pretrained_peopleseg_r80x60m160x120_disttrans_contdet_baware": (
        "people_b3_teacher"
    ),
}


@pytest.mark.parametrize(("alias", "target"), list(ALIASES.items()))
def test_the_users_config_names_are_aliases_at_the_seed_sizes(alias, target):
    from kdlab.config.loader import list_named_configs, resolve_config

    assert alias in list_named_configs()
    cfg, base = resolve_config(alias), resolve_config(target)
    assert cfg.name == alias
    assert (cfg.data.input_size, cfg.model.roi_size, cfg.model.mask_size) == (
        (640, 640),
        (80, 60),
        (160, 120),
    )

    def comparable(c):
        data = c.model_dump(mode="json")
        data.pop("name"), data.pop("description")
        data["distillation"].pop("teacher_experiment")
        return data

    if "disttrans_contdet_baware" in alias:  # the teacher alias adds the instance cues its name promises
        loss = cfg.training.loss
        assert cfg.model.instance_cues and loss.distance > 0 and loss.contour > 0 and loss.boundary_weight > 0
        cues = {"model": {"instance_cues": False},
                "training": {"loss": {"distance": 0.0, "contour": 0.0, "boundary_weight": 0.0}}}  # fmt: skip
        cfg = cfg.model_validate(_deep_merge(cfg.model_dump(mode="json"), cues))
    assert comparable(cfg) == comparable(base)


def _deep_merge(data: dict, update: dict) -> dict:
    out = dict(data)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) else value
    return out


def test_the_aliases_plan_teacher_first_and_the_distilled_alias_learns_from_the_teacher_alias():
    student, distilled, teacher = ALIASES
    planned = plan_runs([distilled, student, teacher], [], {}, [])
    assert [p.run_name for p in planned] == [student, teacher, distilled]
    assert planned[2].depends_on == teacher
    assert planned[0].config.model.encoder == planned[2].config.model.encoder  # the report's baseline pairing


def _started_at(run_dir: Path) -> float:
    """When the runner started the run: the time on the first line of its log."""
    header = (run_dir / "logs" / "stdout.txt").read_text().splitlines()[0]
    assert header.startswith("# kdlab runner: "), header
    return float(header.rsplit(" at ", 1)[1])


def test_in_parallel_students_start_after_their_teacher_and_other_runs_overlap_it(digits_two_seeds):
    _, out = digits_two_seeds
    teacher = out / "digits_teacher"
    teacher_done = (teacher / "summary.json").stat().st_mtime
    best_written = (teacher / "checkpoints" / "best_model.pth").stat().st_mtime
    for seed in (3, 4):
        assert (
            _started_at(out / f"digits_student_distill__seed-{seed}")
            >= max(best_written, teacher_done) - 0.01
        )
    # the baselines need no teacher: with two slots the first one runs beside it
    assert _started_at(out / "digits_student_baseline__seed-3") < teacher_done
    assert "on cpu#" in (out / "digits_student_baseline__seed-3" / "logs" / "stdout.txt").read_text()


def test_a_completed_run_that_owes_its_test_pass_is_not_finished(tmp_path):
    """Killed during the test pass: summary.json says completed (the trainer wrote it) but has no test_metrics;
    `--resume` must run it again (the trainer has nothing left to train; the test pass runs)."""
    import json as _json

    from kdlab.experiments.child_run import finished_before

    (planned,) = plan_runs(["quickstart_baseline"], [f"output_dir={tmp_path}"], {}, [])
    run_dir = planned.run_dir()
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best_model.pth").write_bytes(b"x")
    summary = {"status": "completed", "epochs": planned.config.training.epochs, "test_images": 64}
    (run_dir / "summary.json").write_text(_json.dumps(summary))
    assert not finished_before(planned)
    summary["test_metrics"] = {"miou": 0.5}
    (run_dir / "summary.json").write_text(_json.dumps(summary))
    assert finished_before(planned)
    summary = {"status": "completed", "epochs": planned.config.training.epochs, "test_images": 0}
    (run_dir / "summary.json").write_text(_json.dumps(summary))
    assert finished_before(planned)  # no test split: nothing owed


def test_a_finished_run_exported_by_its_own_process_is_not_exported_again_on_resume(tmp_path):
    """`--resume` over finished runs ("exists") keeps their own export record: re-exporting and re-scoring
    every earlier run cost minutes per pass (the 6-seed quickstart re-exported its 7 earlier runs)."""
    import json as _json

    from kdlab.experiments.child_run import exported_before

    (planned,) = plan_runs(["quickstart_baseline"], [f"output_dir={tmp_path}"], {}, [])
    run_dir = planned.run_dir()
    (run_dir / "checkpoints").mkdir(parents=True)
    record = {"ok": True, "exporter": "dynamo", "precision": "fp32"}
    (run_dir / "summary.json").write_text(_json.dumps({"status": "completed", "export": record}))
    assert exported_before(planned, run_dir) is None  # the file is gone: export again
    (run_dir / "checkpoints" / "best_model.onnx").write_bytes(b"onnx")
    assert exported_before(planned, run_dir) == record
    (int8,) = plan_runs(["quickstart_baseline"], [f"output_dir={tmp_path}", "export.quantize=int8"], {}, [])
    assert exported_before(int8, run_dir) is None  # INT8 asked for now: the old export has none
    (run_dir / "summary.json").write_text(_json.dumps({"status": "completed", "export": {"ok": False}}))
    assert exported_before(planned, run_dir) is None
