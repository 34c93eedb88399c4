"""Which runs a `run_experiments.py` invocation makes: named suites and their defaults, sweeps, seeds, each
run's resolved config and the order they run in.

An experiment whose teacher is another experiment (`distillation.teacher_experiment`) is planned after it and
gets its best_model.pth. With several seeds every config runs once per seed (`<config>__seed-<s>`,
`training.seed=<s>`); a teacher of a listed config runs once and serves every seed of its students unless
`seed_teachers`, when student seed s learns from teacher seed s. A baseline and a distilled student of one
seed share their initial weights and data order (both come from `training.seed`), so their difference is a
paired comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config.loader import parse_set_items, resolve_config
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import ConfigError

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
    # the same pair from ImageNet at the seed sizes (Lite2 teacher, Lite0 students), on people_b3_teacher's data
    "people_pretrained": ["people_lite2_teacher", "people_lite0_baseline", "people_lite0_from_lite2"],
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
