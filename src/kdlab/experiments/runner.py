"""Run several experiments, each as its own process (in series, or several at once), then export and compare them.

Each experiment runs `python -m kdlab.cli.train ...` (the CLI behind train_advanced.py) through an argument
list (never a shell); its output is streamed live and into `<run>/logs/stdout.txt`; its true exit status is
recorded. A failed experiment is recorded with the tail of its log and the others still run (unless
fail_fast). An experiment whose teacher is another experiment (`distillation.teacher_experiment`) runs after
it and gets its best_model.pth; if that teacher failed, it is skipped.

With several seeds every config runs once per seed (`<config>__seed-<s>`, `training.seed=<s>`); a teacher of a
listed config runs once and serves every seed of its students unless `seed_teachers`, when student seed s
learns from teacher seed s. A baseline and a distilled student of one seed share their initial weights and
data order (both come from `training.seed`), so their difference is a paired comparison.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kdlab
from kdlab.config.loader import parse_set_items, resolve_config
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import ConfigError
from kdlab.experiments.run_lock import run_dir_holder
from kdlab.experiments.scheduler import ChildSpec, Launcher, ProcessLauncher, Slot, SlotPool, schedule

log = logging.getLogger(__name__)

SUITES: dict[str, list[str]] = {
    # The main job: does distillation help? Its students run over the seeds of SUITE_DEFAULTS. The faster
    # student has its own suite: three more runs per seed do not fit the main job's 15 minutes on 2 cores.
    "quickstart": ["quickstart_teacher", "quickstart_baseline", "quickstart_distill"],
    # quickstart_fast_distill: the faster student (docs/people-model.md, "A faster student"), beside the plain
    # distilled B0, so the table shows what its lighter decoder and head cost in accuracy.
    "quickstart_fast": [
        "quickstart_teacher",
        "quickstart_baseline",
        "quickstart_distill",
        "quickstart_fast_distill",
    ],
    # The distillation methods compared on the quickstart data and teacher (docs/distillation-methods.md):
    # every student shares the baseline's schedule, seed and so initial weights. Not part of CI.
    "quickstart_methods": [
        "quickstart_teacher",
        "quickstart_baseline",
        "quickstart_distill",
        "quickstart_kd_ls",
        "quickstart_dist",
        "quickstart_cwd",
        "quickstart_mgd",
        "quickstart_kd_dist",
    ],
    # The quickstart pair from ImageNet encoders (EfficientNet-Lite2 teacher, Lite0 students): weights from
    # `kdlab-weights import` (docs/data.md, "Encoder weights"). Not part of CI.
    "quickstart_pretrained": [
        "quickstart_pretrained_teacher",
        "quickstart_pretrained_baseline",
        "quickstart_pretrained_distill",
    ],
    "people": ["people_b3_teacher", "people_b0_baseline", "people_b0_from_b3"],
    "digits": ["digits_teacher", "digits_student_baseline", "digits_student_distill"],
    "sequence": ["sequence_teacher", "sequence_student_baseline", "sequence_student_distill"],
}
# What a suite brings when the command names it alone and gives none of these: the main job runs its students
# over several seeds, side by side, so that its table can resolve distillation's effect (one seed cannot:
# docs/people-model.md, "The main job's protocol"). --seed N (one run) or --seeds/--parallel override them.
SUITE_DEFAULTS: dict[str, dict[str, Any]] = {
    "quickstart": {"seeds": [0, 1, 2], "parallel": 2},
}


def suite_defaults(configs: list[str]) -> dict[str, Any]:
    """The defaults (`SUITE_DEFAULTS`) of the one suite `configs` names, else {}."""
    return dict(SUITE_DEFAULTS.get(configs[0], {})) if len(configs) == 1 else {}


# The child is the training CLI as a module, so it runs the same from a checkout and from an installed wheel.
TRAIN_MODULE = "kdlab.cli.train"
ERROR_TAIL_LINES = 30


@dataclass
class PlannedRun:
    """One experiment to run: its config name, extra `--set` items (sweeps) and resolved config."""

    config_name: str
    run_name: str
    set_items: list[str]
    config: ExperimentConfig
    depends_on: str | None = None
    seed: int | None = None  # set when the runner varies seeds (--seeds)
    group: str = ""  # run_name without the seed suffix: the runs of one config (and sweep value)
    resume_from: str | None = None  # an explicit checkpoint to continue (--resume PATH)

    def run_dir(self) -> Path:
        """Where the run lives: the run directory of an explicit resume checkpoint, else <output_dir>/<run>."""
        if self.resume_from is not None:
            path = Path(self.resume_from)
            if path.parent.name == "checkpoints":
                return path.parent.parent
        return Path(self.config.output_dir) / self.run_name


@dataclass
class RunResult:
    name: str
    config_name: str
    run_dir: str
    status: str  # completed | failed | skipped | interrupted | exists
    exit_code: int | None
    duration_s: float
    command: list[str]
    error_tail: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] | None = None
    seed: int | None = None
    group: str | None = None


def expand_configs(names: list[str]) -> list[str]:
    """Expand suite names (e.g. `quickstart`) into their configs, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        for item in SUITES.get(name, [name]):
            if item not in out:
                out.append(item)
    return out


def parse_sweeps(sweeps: list[str]) -> list[list[tuple[str, str]]]:
    """`["a.b=1,2", "c=x,y"]` -> the cartesian product as lists of (key, value) pairs."""
    combos: list[list[tuple[str, str]]] = [[]]
    for sweep in sweeps:
        if "=" not in sweep:
            raise ConfigError(f"--sweep expects key=v1,v2,..., got '{sweep}'")
        key, values = sweep.split("=", 1)
        items = [v for v in values.split(",") if v != ""]
        if not items:
            raise ConfigError(f"--sweep {key} has no values")
        parse_set_items([f"{key}={items[0]}"])  # validates the key, naming the closest one on a typo
        combos = [combo + [(key, v)] for combo in combos for v in items]
    return combos


def _sweep_suffix(combo: list[tuple[str, str]]) -> str:
    parts = []
    for key, value in combo:
        safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in value)
        parts.append(f"{key.rsplit('.', 1)[-1]}-{safe}")
    return "__" + "__".join(parts) if parts else ""


SEED_SUFFIX = "__seed-"


def check_seeds(seeds: list[int] | None) -> list[int]:
    """The seeds of --seeds, each a distinct integer >= 0 (a ConfigError otherwise)."""
    seeds = list(seeds or [])
    for seed in seeds:
        if seed < 0:
            raise ConfigError(f"--seeds must be integers >= 0, got {seed}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(
            f"--seeds lists {', '.join(map(str, repeated))} more than once; give each seed once"
        )
    return seeds


def plan_runs(
    config_names: list[str],
    set_items: list[str],
    flags: dict[str, Any],
    sweeps: list[str],
    seeds: list[int] | None = None,
    seed_teachers: bool = False,
) -> list[PlannedRun]:
    """Resolve every config (failing early on bad input) and order teachers before their students.

    Sweeps vary the students: a config that another listed config names as its
    `distillation.teacher_experiment` runs once, unswept, so `--configs digits --sweep model.name=a,b`
    compares several students against one teacher in one table. Seeds multiply every run (one per
    (sweep value, seed)) except such teachers, which run once unless `seed_teachers`.
    """
    planned: list[PlannedRun] = []
    names = expand_configs(config_names)
    seeds = check_seeds(seeds)
    bases = {name: resolve_config(name, set_items, flags) for name in names}
    teachers = {
        b.distillation.teacher_experiment for b in bases.values() if b.distillation.teacher_experiment
    }
    listed = {b.name for b in bases.values()}
    combos_all = parse_sweeps(sweeps)
    for name in names:
        base = bases[name]
        is_teacher = base.name in teachers
        combos = [[]] if sweeps and is_teacher else combos_all
        if sweeps and is_teacher:
            log.info("%s is the teacher of a listed config: it runs once, not swept", base.name)
        run_seeds: list[int | None] = list(seeds) if seeds else [None]
        if seeds and is_teacher and not seed_teachers:
            log.info("%s is the teacher of a listed config: it runs once for all seeds", base.name)
            run_seeds = [None]
        teacher = base.distillation.teacher_experiment
        for combo in combos:
            group = base.name + _sweep_suffix(combo)
            for seed in run_seeds:
                run_name = group + (f"{SEED_SUFFIX}{seed}" if seed is not None else "")
                items = list(set_items) + [f"{k}={v}" for k, v in combo]
                if seed is not None:
                    items.append(f"training.seed={seed}")
                depends_on = teacher
                if seed is not None and seed_teachers and teacher in listed:
                    depends_on = f"{teacher}{SEED_SUFFIX}{seed}"
                    items.append(f"distillation.teacher_experiment={depends_on}")
                if run_name != base.name:
                    items.append(f"name={run_name}")
                cfg = resolve_config(name, items, flags)
                planned.append(PlannedRun(name, run_name, items, cfg, depends_on, seed, group))
    run_names = {p.run_name for p in planned}
    ordered: list[PlannedRun] = []
    pending = list(planned)
    while pending:
        ready = [
            p
            for p in pending
            if p.depends_on not in run_names or p.depends_on in {o.run_name for o in ordered}
        ]
        if not ready:
            cycle = ", ".join(p.run_name for p in pending)
            raise ConfigError(f"distillation.teacher_experiment forms a cycle among: {cycle}")
        for p in ready:
            ordered.append(p)
            pending.remove(p)
    return ordered


def _tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    with path.open(errors="replace") as fh:
        return "".join(deque(fh, maxlen=lines))


def child_command(
    run: PlannedRun,
    flags_argv: list[str],
    teacher_ckpt: Path | None,
    resume: str | None,
    export: bool = False,
) -> list[str]:
    """The training argument list of one run; `resume` is "auto" or a checkpoint path; `export`: the child
    exports its student to ONNX after training (`--export_onnx`), on its own device, in its own job."""
    command = [sys.executable, "-m", TRAIN_MODULE, "--config", run.config_name, "--no_progress"]
    if run.set_items:
        command += ["--set", *run.set_items]
    command += flags_argv
    if teacher_ckpt is not None:
        command += ["--teacher_checkpoint", str(teacher_ckpt)]
    if resume:
        command += ["--resume", resume]
    if export:
        command += ["--export_onnx"]
    return command


def exports_in_run(run: PlannedRun) -> bool:
    """Whether the run's task ships as ONNX (the sequence task has no exporter)."""
    from kdlab.tasks import task_of

    return task_of(run.config).exporter() is not None


def recorded_export(run_dir: Path) -> dict[str, Any] | None:
    """The export outcome a child wrote into summary.json (`export`), if any."""
    try:
        export = json.loads((run_dir / "summary.json").read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return None
    return export if isinstance(export, dict) else None


def exported_before(run: PlannedRun, run_dir: Path) -> dict[str, Any] | None:
    """The export record of a finished run whose own process exported it (summary.json `export`, ok, and
    checkpoints/best_model.onnx still there), so that a --resume pass does not export and score it again; None
    when the run must be exported (no record, a failed one, a missing file, or INT8 now asked for)."""
    export = recorded_export(run_dir)
    if export is None or not export.get("ok") or run.config.export.quantize != "none":
        return None
    return export if (run_dir / "checkpoints" / "best_model.onnx").is_file() else None


def child_env() -> dict[str, str]:
    """This process's environment, unbuffered, with the directory holding this kdlab package first on
    PYTHONPATH, so the child imports the same kdlab (a checkout's src/ or an installed site-packages)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_parent = str(Path(kdlab.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def finished_before(run: PlannedRun) -> bool:
    """A run that already trained to its planned epochs (summary.json says completed, best_model.pth exists)
    and, when it has a test split, was scored on it (a kill during the test pass leaves a completed summary
    without test_metrics): `--resume` does not run it again."""
    run_dir = run.run_dir()
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        summary.get("status") == "completed"
        and summary.get("epochs") == run.config.training.epochs
        and (run_dir / "checkpoints" / "best_model.pth").is_file()
        and (not summary.get("test_images") or isinstance(summary.get("test_metrics"), dict))
    )


def with_torchrun(command: list[str], devices: int) -> list[str]:
    """A training command launched under torchrun on `devices` local processes (one per GPU), when > 1."""
    if devices <= 1:
        return command
    assert command[1:3] == ["-m", TRAIN_MODULE]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
    return launch + ["-m", TRAIN_MODULE, *command[3:]]


class SuiteBook:
    """The runner's side of the scheduler (kdlab.experiments.scheduler.RunBook): commands, logs, results."""

    def __init__(
        self, planned: list[PlannedRun], flags_argv: list[str], output_dir: Path, resume: bool, fail_fast: bool,
        on_result: Callable[[RunResult], None] | None, gpus_for: Callable[[int], int] | None = None,
        job_kind: str | None = None, export: bool = False, adopt: Callable[[str], Any] | None = None,
    ) -> None:  # fmt: skip
        self.by_name = {p.run_name: p for p in planned}
        self.order = {p.run_name: i for i, p in enumerate(planned)}
        self.flags_argv, self.output_dir = flags_argv, output_dir
        self.resume, self.fail_fast = resume, fail_fast
        self.on_result = on_result
        self.gpus_for = gpus_for  # cluster jobs: the GPUs a run's job asks for
        self.job_kind = job_kind  # "Slurm job", "submitit local job"; None for a plain child process
        self.export = export  # each child exports its run to ONNX after training (scored on its own device)
        self.adopt = adopt  # cluster jobs: run name -> the ChildSpec of a job an earlier runner left, or None
        self.env = child_env()
        self.results: dict[str, RunResult] = {}
        self.commands: dict[str, tuple[list[str], str | None]] = {}

    def _record(self, result: RunResult) -> RunResult:
        self.results[result.name] = result
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _result(self, run: PlannedRun, status: str, code: int | None, seconds: float, command: list[str],
                tail: str = "") -> RunResult:  # fmt: skip
        return RunResult(
            run.run_name, run.config_name, str(run.run_dir()), status, code, seconds, command, tail,
            run.config.model_dump(mode="json"), seed=run.seed, group=run.group or run.run_name,
        )  # fmt: skip

    def teacher_of(self, run: PlannedRun) -> str | None:
        return run.depends_on if run.depends_on in self.by_name else None

    def blocked(self, run: PlannedRun) -> str | None:
        teacher = self.teacher_of(run)
        if teacher is None:
            return None
        result = self.results.get(teacher)
        if result is None:
            return "wait"
        if result.status not in ("completed", "exists"):
            return f"teacher experiment {teacher} {result.status}"
        ckpt = Path(result.run_dir) / "checkpoints" / "best_model.pth"
        return None if ckpt.is_file() else f"teacher experiment {teacher} left no {ckpt}"

    def devices_of(self, run: PlannedRun) -> int:
        return run.config.training.devices_per_run

    def prepare(self, run: PlannedRun, slot: Slot | None) -> ChildSpec | RunResult:
        run_dir = run.run_dir()
        if self.resume and self.adopt is not None and run.resume_from is None:
            left = self.adopt(run.run_name)  # a job a killed runner submitted: collected, not resubmitted
            if left is not None:
                argv = left.command
                resume_arg = argv[argv.index("--resume") + 1] if "--resume" in argv else None
                self.commands[run.run_name] = (argv, resume_arg)
                return left
        if self.resume and run.resume_from is None and finished_before(run):
            log.info(
                "%s: already trained to %d epochs; not rerun (--resume)",
                run.run_name,
                run.config.training.epochs,
            )
            result = self._result(run, "exists", None, 0.0, [])
            result.export = exported_before(run, run_dir)  # not exported again after the suite
            return self._record(result)
        holder = run_dir_holder(run_dir)
        if holder is not None:
            message = f"run directory {run_dir} is in use by {holder}; not started"
            log.error("%s: %s", run.run_name, message)
            return self._record(self._result(run, "failed", None, 0.0, [], message))
        teacher = self.teacher_of(run)
        teacher_ckpt = self.by_name[teacher].run_dir() / "checkpoints" / "best_model.pth" if teacher else None
        resume_arg = run.resume_from or ("auto" if self.resume else None)
        devices = len(slot.gpus) if slot is not None and slot.gpus else 0
        if self.gpus_for is not None:
            devices = self.gpus_for(self.devices_of(run))
        export = self.export and exports_in_run(run)
        command = with_torchrun(
            child_command(run, self.flags_argv, teacher_ckpt, resume_arg, export), devices
        )
        self.commands[run.run_name] = (command, resume_arg)
        where = slot.label if slot is not None else f"{devices} GPU"
        if self.job_kind:
            where += f" as a {self.job_kind}"
        visible = slot.env().get("CUDA_VISIBLE_DEVICES") if slot is not None else None
        header = (
            f"# kdlab runner: {run.run_name} on {where}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f" at {time.time():.3f}"
        )
        log.info(
            "[%d/%d] %s: %s", self.order[run.run_name] + 1, len(self.order), run.run_name, " ".join(command)
        )
        env = {**self.env, **(slot.env() if slot is not None else {})}
        staging = self.output_dir / ".runner" / f"{run.run_name}.stdout.txt"
        keep_child_log(
            staging, run_dir, append=True
        )  # what a killed runner's child wrote is kept, not overwritten
        return ChildSpec(command, env, staging, devices=devices, header=header)

    def skip(self, run: PlannedRun, reason: str) -> RunResult:
        log.error("skipping %s: %s", run.run_name, reason)
        return self._record(self._result(run, "skipped", None, 0.0, [], reason))

    def finish(self, run: PlannedRun, code: int, seconds: float, slot: Slot | None) -> RunResult:
        command, resume_arg = self.commands.get(run.run_name, ([], None))
        run_dir = run.run_dir()
        staging = self.output_dir / ".runner" / f"{run.run_name}.stdout.txt"
        final_log = keep_child_log(staging, run_dir, append=bool(resume_arg))
        status = {0: "completed", 130: "interrupted", 143: "interrupted"}.get(code, "failed")
        export = recorded_export(run_dir) if "--export_onnx" in command and status == "completed" else None
        teacher = self.teacher_of(run)
        if status == "failed" and teacher and self.results.get(teacher, None) is not None:
            if self.results[teacher].status not in ("completed", "exists"):  # a cluster job cancelled with it
                status = "skipped"
        result = self._result(
            run, status, code, seconds, command, _tail(final_log) if status != "completed" else ""
        )
        result.export = export
        log.info("%s: %s (exit %d) in %.1f s", run.run_name, status, code, seconds)
        return self._record(result)

    def stops(self, result: RunResult) -> bool:
        if result.status == "interrupted":
            return True
        if result.status == "failed" and self.fail_fast:
            log.error("--fail_fast: stopping after %s failed", result.name)
            return True
        return False


def keep_child_log(staging: Path, run_dir: Path, append: bool) -> Path:
    """Move a child's log from the runner's staging area into `<run>/logs/stdout.txt` (appended to the earlier
    one when the run resumed); it stays in staging when the run never made its directory."""
    if not staging.is_file():
        return staging
    if not run_dir.is_dir():
        return staging
    final_log = run_dir / "logs" / "stdout.txt"
    final_log.parent.mkdir(parents=True, exist_ok=True)
    if final_log.exists() and append:
        with final_log.open("a") as out, staging.open() as inp:
            shutil.copyfileobj(inp, out)
        staging.unlink()
    else:
        shutil.move(staging, final_log)
    return final_log


def run_all(
    planned: list[PlannedRun],
    flags_argv: list[str],
    output_dir: Path,
    resume: bool = False,
    fail_fast: bool = False,
    skip_training: bool = False,
    *,
    gpus: list[int] | None = None,
    parallel: int | None = None,
    threads_per_run: int | None = None,
    launcher: Launcher | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    export: bool = False,
) -> list[RunResult]:
    """Train every planned run (or, with skip_training, just collect the existing ones), in plan order.

    `parallel`/`gpus` run several at once on this machine (kdlab.experiments.scheduler); `launcher` replaces
    local processes with cluster jobs (kdlab.experiments.slurm). `on_result` is called as each run ends.
    `export`: each trained run exports itself to ONNX in its own process (`--export_onnx`)."""
    if skip_training:
        results = []
        for run in planned:
            run_dir = run.run_dir()
            best = run_dir / "checkpoints" / "best_model.pth"
            exists = best.is_file()
            results.append(RunResult(
                run.run_name, run.config_name, str(run_dir), "exists" if exists else "missing", None, 0.0, [],
                "" if exists else f"no {best}", run.config.model_dump(mode="json"),
                seed=run.seed, group=run.group or run.run_name,
            ))  # fmt: skip
        return results
    gpus_for = getattr(launcher, "gpus_for", None)
    book = SuiteBook(planned, flags_argv, output_dir, resume, fail_fast, on_result, gpus_for=gpus_for,
                     job_kind=getattr(launcher, "job_kind", None), export=export,
                     adopt=getattr(launcher, "recorded_job", None))  # fmt: skip
    if launcher is None:
        launcher, pool = ProcessLauncher(), SlotPool(gpus, parallel, threads=threads_per_run)
    else:
        pool = None if launcher.expresses_dependencies else SlotPool(None, parallel, threads=threads_per_run)
    schedule(planned, book, launcher, pool)
    return sorted(book.results.values(), key=lambda r: book.order[r.name])
