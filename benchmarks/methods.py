"""Methods suite: each distillation method's online KD training step, as a ratio over the plain KD step.

A case is a (case name, named config) pair in `CASES`. The case's `distillation` section is taken from its named
config (resolved with `resolve_config`) and replaces the benchmark experiment config's (`experiment_config(s)`),
so the models' sizes and encoders come from the benchmark settings and the method (KL on standardised logits,
DIST, CWD, MGD with its generator, ...) from the config; gradient-share measurement is off in every case
(`distillation.grad_share_every=0`). Each case is the project's own training step, `Trainer.forward_backward` +
`Trainer.optimizer_step` on a `build_kd_task` task, with its own student (same seed, so the same initial
weights) and one shared random-init teacher. All cases are timed interleaved in one run (`interleaved`);
`<case>_over_kd` is the case's median step time over the plain KD step's ("kd": the seed's per-pixel KL on
the three heads), and `<case>_over_kd_per_rep_median` the median of the per-round ratios. Only ratios from
one run are comparable on a shared machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchSettings, Clock, experiment_config, interleaved, median, synthetic_batch
from benchmarks.kd import _no_eval, random_teacher
from kdlab.config.loader import resolve_config, validate_config
from kdlab.config.schema import ExperimentConfig
from kdlab.engine.batches import batch_to_device
from kdlab.engine.trainer import Trainer
from kdlab.experiments.kd_setup import build_kd_task
from kdlab.models.builders import build_model

REFERENCE = "kd"
# (case, named config whose `distillation` section the case uses). The first is the reference. Add a case with
# one line.
CASES: tuple[tuple[str, str], ...] = (
    (REFERENCE, "quickstart_distill"),  # the seed's per-pixel KL on the three heads
    ("kd_ls", "quickstart_kd_ls"),  # KL on class-standardised logits
    ("dist", "quickstart_dist"),  # DIST on the 3-class logits, no KL
    ("cwd", "quickstart_cwd"),  # channel-wise distillation on the logits, no KL
    ("mgd", "quickstart_mgd"),  # masked generative distillation on a decoder feature (+ its generator)
    ("kd_dist", "quickstart_kd_dist"),  # the KL on the three heads + DIST on the logits
)


def method_config(s: BenchSettings, config_name: str) -> ExperimentConfig:
    """The benchmark's experiment config with `config_name`'s distillation section (grad-share off)."""
    data = experiment_config(s).model_dump(mode="json")
    distillation = resolve_config(config_name).distillation.model_dump(mode="json")
    data["distillation"] = {**distillation, "grad_share_every": 0}
    return validate_config(data, where=f"benchmark settings + {config_name}.distillation")


class MethodSteps:
    """One KD trainer per case, built once on the device; `step(case)` is one training step."""

    def __init__(self, s: BenchSettings, run_dir: Path, cases: tuple[tuple[str, str], ...] = CASES) -> None:
        if not cases or cases[0][0] != REFERENCE:
            raise ValueError(f"the first case must be the reference '{REFERENCE}'")
        self.device = torch.device(s.device)
        self.cfg = experiment_config(s)
        self.raw = synthetic_batch(s, self.cfg)
        if self.device.type == "cuda":
            self.raw = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.raw.items()}
        self.teacher = random_teacher(self.cfg, s.teacher_encoder)  # shared: every case runs it frozen
        steps = range(1000)  # the trainer only needs len(train_loader) for its LR schedule
        self.configs: dict[str, str] = {}
        self.trainers: dict[str, Trainer] = {}
        for case, config_name in cases:
            cfg = method_config(s, config_name)
            torch.manual_seed(0)
            student = build_model(cfg.model)
            task, _, records, ema = build_kd_task(cfg, student, [self.teacher], self.device)
            self.trainers[case] = Trainer(
                cfg, student, task, steps, _no_eval, run_dir, self.device, show_progress=False,
                teacher_records=records, ema=ema,
            )  # fmt: skip
            self.configs[case] = config_name

    def step_fn(self, case: str) -> Callable[[], None]:
        trainer = self.trainers[case]

        def step() -> None:
            trainer.forward_backward(batch_to_device(self.raw, self.device, self.cfg.training.channels_last))
            trainer.optimizer_step()

        return step


def run_methods_suite(s: BenchSettings, cases: tuple[tuple[str, str], ...] = CASES) -> dict[str, Any]:
    device = torch.device(s.device)
    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as tmp:
        steps = MethodSteps(s, Path(tmp), cases)
        timed = {case: steps.step_fn(case) for case in steps.trainers}
        times, cpu_times = interleaved(clock, timed, s.reps, s.warmup)
        amp = steps.trainers[REFERENCE].amp_dtype
    ref = times[REFERENCE]
    ref_median = median(ref)
    out: dict[str, Any] = {"cases": dict(steps.configs), "reference": REFERENCE}
    for case in timed:
        t = times[case]
        out[f"{case}_step_ms"] = median(t) * 1e3
        out[f"{case}_over_kd"] = median(t) / ref_median  # the reference over itself: exactly 1.0
        out[f"{case}_over_kd_per_rep_median"] = median([a / b for a, b in zip(t, ref, strict=True)])
        if device.type == "cpu":
            out[f"{case}_over_kd_cpu_time"] = median(cpu_times[case]) / median(cpu_times[REFERENCE])
    out.update({
        "rois_per_batch": s.batch_size * s.rois_per_image,
        "amp": str(amp).replace("torch.", "") if amp else "off",
        "grad_share_steps": "excluded (distillation.grad_share_every=0)",
        "times_s": times,
        "cpu_times_s": cpu_times if device.type == "cpu" else None,
    })  # fmt: skip
    return out


def methods_table(m: dict[str, Any]) -> str:
    """Markdown: method (config), ms/step, ratio over plain KD (of medians, and median of per-round ratios)."""
    lines = [
        "| method (config) | ms/step | over plain KD | per-round median |",
        "|---|---|---|---|",
    ]
    for case, config_name in m["cases"].items():
        lines.append(
            f"| {case} ({config_name}) | {_ms(m[f'{case}_step_ms'])} | {m[f'{case}_over_kd']:.3f} "
            f"| {m[f'{case}_over_kd_per_rep_median']:.3f} |"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
