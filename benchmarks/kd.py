"""KD suite: student step (a), teacher inference (b), the project's KD step (c), a naive loop, peak memory,
and the KD step from cached teacher outputs (d, offline distillation: no teacher runs).

(a) and (c) are the project's own training step, `Trainer.forward_backward` + `Trainer.optimizer_step`, with
`SegmentationTask` and `SegmentationKDTask` (built by `build_kd_task`, gradient-share measurement off); (b) is the frozen
teacher's forward exactly as SegmentationKDTask calls it (same autocast, input already on the device). The naive loop is
the obvious way to write online distillation: fp32, no channels_last, teacher with autograd on, and the full
model run once per ROI; it computes the same losses. (d) is `SegmentationKDTask(cached=True)` on a batch that carries
the teacher's three heads as float16 ROI rows, as a `CachedPeopleDataset` batch does (the HDF5 read happens
in loader workers and is not part of the step).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BenchSettings,
    Clock,
    experiment_config,
    interleaved,
    median,
    settings_from_json,
    synthetic_batch,
)
from kdlab.config.schema import ExperimentConfig
from kdlab.distill.kd_segmentation import HEADS, SegmentationKDTask
from kdlab.distill.losses import kd_kl_loss, teacher_probs
from kdlab.distill.teacher import FrozenTeacher, LoadedTeacher
from kdlab.engine.batches import batch_to_device
from kdlab.engine.trainer import Trainer
from kdlab.experiments.kd_setup import build_kd_task
from kdlab.models.builders import build_model
from kdlab.models.losses import SegmentationLossWeights, segmentation_loss
from kdlab.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]


def _no_eval(model: torch.nn.Module, desc: str = "val") -> tuple[dict[str, float], None]:
    return {}, None


def random_teacher(cfg: ExperimentConfig, encoder: str) -> LoadedTeacher:
    """A random-init teacher of `encoder` with the student's head sizes (latency does not depend on weights)."""
    tcfg = cfg.model.model_copy(update={"encoder": encoder, "encoder_weights": None})
    teacher_config = cfg.model_copy(update={"model": tcfg}).model_dump(mode="json")
    return LoadedTeacher(FrozenTeacher(build_model(tcfg)), "<random init>", "", teacher_config)


class ProjectSteps:
    """The three measured steps, built once on the device."""

    def __init__(self, s: BenchSettings, run_dir: Path) -> None:
        self.device = torch.device(s.device)
        self.cfg = experiment_config(s)
        self.raw = synthetic_batch(s, self.cfg)
        if self.device.type == "cuda":
            self.raw = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.raw.items()}
        steps = range(1000)  # the trainer only needs len(train_loader) for its LR schedule
        torch.manual_seed(0)
        self.student_trainer = Trainer(
            self.cfg, build_model(self.cfg.model), SegmentationTask(self.cfg.training.loss), steps, _no_eval,
            run_dir, self.device, show_progress=False,
        )  # fmt: skip
        torch.manual_seed(0)
        kd_student = build_model(self.cfg.model)
        teacher = random_teacher(self.cfg, s.teacher_encoder)
        task, _, records, ema = build_kd_task(self.cfg, kd_student, [teacher], self.device)
        self.kd_task = task
        self.teacher = task.teachers[0][0]
        self.kd_trainer = Trainer(
            self.cfg, kd_student, task, steps, _no_eval, run_dir, self.device, show_progress=False,
            teacher_records=records, ema=ema,
        )  # fmt: skip
        self.on_device = batch_to_device(self.raw, self.device, self.cfg.training.channels_last)
        torch.manual_seed(0)
        cached_task = SegmentationKDTask(self.cfg.distillation, self.cfg.training.loss, [], None, cached=True)
        self.cached_trainer = Trainer(
            self.cfg, build_model(self.cfg.model), cached_task, steps, _no_eval, run_dir, self.device,
            show_progress=False,
        )  # fmt: skip
        with self.kd_trainer._autocast():
            outputs = self.teacher(self.on_device["images"], self.on_device["rois"])
        cached = {f"teacher_{key}": outputs[key].half().cpu() for _, key in HEADS}
        if self.device.type == "cuda":
            cached = {k: v.pin_memory() for k, v in cached.items()}
        self.cached_raw = {**self.raw, **cached}

    def student_step(self) -> None:
        t = self.student_trainer
        t.forward_backward(batch_to_device(self.raw, self.device, self.cfg.training.channels_last))
        t.optimizer_step()

    def teacher_step(self) -> None:
        with self.kd_trainer._autocast():
            self.teacher(self.on_device["images"], self.on_device["rois"])

    def kd_step(self) -> None:
        t = self.kd_trainer
        t.forward_backward(batch_to_device(self.raw, self.device, self.cfg.training.channels_last))
        t.optimizer_step()

    def cached_kd_step(self) -> None:
        t = self.cached_trainer
        t.forward_backward(batch_to_device(self.cached_raw, self.device, self.cfg.training.channels_last))
        t.optimizer_step()


class NaiveLoop:
    """Online distillation written plainly: fp32, NCHW, teacher with autograd, one model pass per ROI."""

    def __init__(self, s: BenchSettings, cfg: ExperimentConfig, raw: dict[str, Any]) -> None:
        self.device = torch.device(s.device)
        torch.manual_seed(0)
        self.student = build_model(cfg.model).to(self.device).train()
        tcfg = cfg.model.model_copy(update={"encoder": s.teacher_encoder})
        self.teacher = build_model(tcfg).to(self.device).eval()  # parameters still require grad
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.training.lr)
        self.weights = SegmentationLossWeights.from_config(cfg.training.loss)
        self.d = cfg.distillation
        self.raw = raw
        self.losses: list[float] = []

    def step(self) -> None:
        images = self.raw["images"].to(self.device).float() / 255.0
        rois = self.raw["rois"].to(self.device)
        masks = self.raw["masks"].to(self.device).long()
        temperature, alpha = self.d.temperature, self.d.alpha
        head_weights = {"distill_final": self.d.final_weight, "distill_bg_fg": self.d.bg_fg_weight,
                        "distill_target": self.d.target_weight}  # fmt: skip
        self.optimizer.zero_grad()
        total = torch.zeros((), device=self.device)
        for i in range(rois.shape[0]):
            b = int(rois[i, 0])
            roi = rois[i : i + 1].clone()
            roi[:, 0] = 0
            student = self.student(images[b : b + 1], roi)
            teacher = self.teacher(images[b : b + 1], roi)
            base = segmentation_loss(student, masks[i : i + 1], self.weights)["base_total"]
            kd = sum(
                head_weights[name] * kd_kl_loss(student[key], teacher_probs(teacher[key].detach(), temperature),
                                                temperature)
                for name, key in HEADS
            )  # fmt: skip
            total = total + alpha * kd + (1 - alpha) * base
        loss = total / rois.shape[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.losses.append(loss.item())


def run_kd_suite(s: BenchSettings) -> dict[str, Any]:
    device = torch.device(s.device)
    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as tmp:
        steps = ProjectSteps(s, Path(tmp))
        cases = {
            "student_step": steps.student_step,
            "teacher_step": steps.teacher_step,
            "kd_step": steps.kd_step,
            "cached_kd_step": steps.cached_kd_step,
        }
        naive = NaiveLoop(s, steps.cfg, steps.raw) if s.naive else None
        if naive is not None:
            cases["naive_step"] = naive.step
        times, cpu_times = interleaved(clock, cases, s.reps, s.warmup)
        memory = cuda_peak_memory(steps, clock) if device.type == "cuda" else None
    a, b, c = (median(times[k]) for k in ("student_step", "teacher_step", "kd_step"))
    per_rep = [
        ci / (ai + bi)
        for ai, bi, ci in zip(times["student_step"], times["teacher_step"], times["kd_step"], strict=True)
    ]
    ca, cb, cc = (median(cpu_times[k]) for k in ("student_step", "teacher_step", "kd_step"))
    d = median(times["cached_kd_step"])
    n = s.batch_size
    out: dict[str, Any] = {
        "cached_kd_step_ms": d * 1e3,
        "cached_kd_over_student": d / a,
        "cached_kd_over_student_per_rep_median": median(
            [di / ai for ai, di in zip(times["student_step"], times["cached_kd_step"], strict=True)]
        ),
        "student_step_ms": a * 1e3,
        "teacher_step_ms": b * 1e3,
        "kd_step_ms": c * 1e3,
        "kd_over_student_plus_teacher": c / (a + b),
        "kd_over_student_plus_teacher_per_rep_median": median(per_rep),
        "kd_over_student_plus_teacher_cpu_time": cc / (ca + cb) if device.type == "cpu" else None,
        "project_images_per_sec": n / c,
        "rois_per_batch": n * s.rois_per_image,
        "amp": str(steps.kd_trainer.amp_dtype).replace("torch.", "") if steps.kd_trainer.amp_dtype else "off",
        "grad_share_steps": "excluded (distillation.grad_share_every=0)",
        "times_s": times,
        "cpu_times_s": cpu_times if device.type == "cpu" else None,
    }
    if naive is not None:
        nv = median(times["naive_step"])
        out.update({"naive_step_ms": nv * 1e3, "naive_images_per_sec": n / nv, "speedup_vs_naive": nv / c})
    if memory is not None:
        out.update(memory)
    elif s.peak_memory:
        out.update(cpu_peak_memory(s))
    return out


def cuda_peak_memory(steps: ProjectSteps, clock: Clock) -> dict[str, Any]:
    """CUDA max_memory_allocated over 3 KD steps. The process also holds the other cases' models (student
    step, naive loop), so `kd_step_peak_over_resident_mib` (peak minus what was allocated before) is reported
    too; the KD step's own footprint is its models plus that."""
    clock.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        steps.kd_step()
    clock.sync()
    peak = torch.cuda.max_memory_allocated()
    return {"kd_peak_memory_mib": peak / 2**20, "kd_peak_memory_kind": "CUDA max_memory_allocated",
            "memory_before_steps_mib": base / 2**20,
            "kd_step_peak_over_resident_mib": (peak - base) / 2**20}  # fmt: skip


def cpu_peak_memory(s: BenchSettings) -> dict[str, Any]:
    """Peak RSS (VmHWM) of a fresh process that builds the KD step and runs it: a process high-water mark."""
    payload = json.dumps(s.to_json())
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kd", "--peak-memory-child", payload],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"kd_peak_memory_mib": None, "kd_peak_memory_error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_rss_mib() -> float:
    """This process's peak resident set. Linux: VmHWM of /proc/self/status, because ru_maxrss carries the
    parent's RSS at fork over the exec into a fresh interpreter; elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    per_mib = 2**20 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib


def _peak_memory_child(payload: str) -> None:
    data = json.loads(payload)
    s = settings_from_json(data)
    if s.threads:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as tmp:
        steps = ProjectSteps(s, Path(tmp))
        built = _max_rss_mib()
        for _ in range(3):
            steps.kd_step()
    print(json.dumps({
        "kd_peak_memory_mib": _max_rss_mib(),
        "kd_peak_memory_kind": "CPU peak RSS of a fresh process: models built + 3 KD steps",
        "memory_before_steps_mib": built,
    }))  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory-child":
        _peak_memory_child(sys.argv[2])
