"""The items of the GPU acceptance check (benchmarks/gpu.py runs them; docs/performance.md describes them).

Each item is a function of the `Context` that returns an `Outcome` or raises (`CheckFailed` with the
child's output tail, `Skip` when it does not apply on this device). Child processes are `sys.executable`
with this checkout's `src` first on PYTHONPATH, run with the output directory as working directory; their
output goes to `<out>/logs/<item>.txt`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu import ROOT, CheckFailed, Item, Outcome, Skip

# The tiny people run of the end-to-end tests (tests/test_runner.py TINY_SET): 64x64 synthetic images.
TINY_PEOPLE = [
    "data.synthetic.image_size=64,64", "data.input_size=64,64", "data.num_workers=0", "model.roi_size=16,12",
    "model.mask_size=32,24", "model.head_channels=16", "training.num_vis_images=1", "training.log_every_steps=1",
]  # fmt: skip
TAIL_LINES = 40


@dataclass
class Child:
    """A finished child process: exit code, its whole output (stdout and stderr together), the log file."""

    argv: list[str]
    returncode: int
    output: str
    log: Path
    seconds: float

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])

    def check(self, what: str) -> None:
        if self.returncode != 0:
            raise CheckFailed(f"{what} exited with {self.returncode} (log {self.log})", self.tail())


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    out: Path
    shared: dict[str, Any] = field(default_factory=dict)  # what items hand to later ones

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def data_root(self) -> Path:
        return self.out / "data"

    def people_set(self, train: int, val: int) -> list[str]:
        """--set items of a tiny people run, its synthetic data under the output directory."""
        return [f"data.synthetic.root={self.data_root}", f"data.synthetic.train_images={train}",
                f"data.synthetic.val_images={val}", f"data.synthetic.test_images={val}", *TINY_PEOPLE]  # fmt: skip

    def env(self, **extra: str) -> dict[str, str]:
        """This environment with the checkout's src first on PYTHONPATH (a plain python works as uv run)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not self.cuda:
            # one thread per child, as in-process: two threads spin against each other on a shared machine
            env.setdefault("OMP_NUM_THREADS", "1")
        src = str(ROOT / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra)
        return env

    def child(self, name: str, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Child:
        """Run `sys.executable *args` in the output directory; a child past `timeout` is stopped (its whole
        process group: the runner's and torchrun's children too) and reported as exit 124."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.txt"
        argv = [sys.executable, *args]
        start = time.perf_counter()
        with log.open("w") as fh:
            fh.write("$ " + " ".join(argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(
                argv, cwd=self.out, env=env or self.env(), stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                code = 124
            except KeyboardInterrupt:  # its own session does not see the terminal's Ctrl-C: pass it on
                _stop_group(proc)
                raise
        output = log.read_text(errors="replace")
        if code == 124:
            output += f"\n[gpu acceptance: stopped after the {timeout:.0f} s limit]\n"
        return Child(argv, code, output, log, time.perf_counter() - start)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (it saves and exits), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"cannot read {path}: {exc}") from None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _require(condition: bool, message: str, tail: str = "") -> None:
    if not condition:
        raise CheckFailed(message, tail)


def check_run_dir(run_dir: Path, device: str, tail: str = "", exported: bool = False) -> dict[str, Any]:
    """A finished run: summary.json completed on `device`, the run files present; returns the summary."""
    summary = _read_json(run_dir / "summary.json")
    _require(
        summary.get("status") == "completed",
        f"{run_dir.name}: summary status {summary.get('status')!r}",
        tail,
    )
    where = str(summary.get("device", ""))
    _require(
        where.split(":")[0] == device,
        f"{run_dir.name}: summary.json device {where!r}, expected {device}",
        tail,
    )
    files = ["config.json", "checkpoints/best_model.pth", "checkpoints/last.pth", "logs/metrics.csv",
             "logs/training_log.txt"]  # fmt: skip
    if exported:
        files += ["checkpoints/best_model.onnx", "checkpoints/best_model.onnx.json"]
    missing = [f for f in files if not (run_dir / f).is_file()]
    _require(not missing, f"{run_dir.name}: missing {', '.join(missing)}", tail)
    return summary


# ------------------------------------------------------------------------------------------- 1. quickstart
def quickstart(ctx: Context) -> Outcome:
    """quickstart_teacher then quickstart_distill (2 epochs each) through run_experiments.py on the device,
    with the ONNX export, the exported file scored by the evaluator and the INT8 step."""
    runs = ctx.out / "quickstart"
    if ctx.cuda:  # the quickstart's own data and sizes (256 + 112 images of 96x96)
        sets = [f"data.synthetic.root={ctx.data_root}"]
        timeout = 330.0
    else:  # tiny, a B0 teacher, the TorchScript exporter (dynamo takes ~25 s per export on 2 cores)
        sets = [*ctx.people_set(8, 4), "model.encoder=timm-efficientnet-b0", "export.calibration_images=4",
                "export.exporter=torchscript", "export.latency_runs=1"]  # fmt: skip
        timeout = 300.0
    args = [str(ROOT / "run_experiments.py"), "--configs", "quickstart_teacher", "quickstart_distill",
            "--epochs", "2", "--output_dir", str(runs), "--device", ctx.device,
            "--quantize", "int8", *([] if ctx.cuda else ["--batch_size", "4"]), "--set", *sets]  # fmt: skip
    child = ctx.child("quickstart", args, timeout)
    child.check("run_experiments.py")
    tail = child.tail()
    records = {r["name"]: r for r in _read_json(runs / "experiment_runs.json")}
    for name in ("quickstart_teacher", "quickstart_distill"):
        status = records.get(name, {}).get("status")
        _require(status == "completed", f"experiment_runs.json: {name} {status!r}", tail)
    teacher = check_run_dir(runs / "quickstart_teacher", ctx.device, tail, exported=True)
    student_dir = runs / "quickstart_distill"
    student = check_run_dir(student_dir, ctx.device, tail, exported=True)
    teacher_ckpt = str(runs / "quickstart_teacher" / "checkpoints" / "best_model.pth")
    used = [str(t.get("path", "")) for t in student.get("teachers") or []]
    _require(any(Path(u).resolve() == Path(teacher_ckpt).resolve() for u in used if u),
             f"quickstart_distill did not record quickstart_teacher as its teacher (teachers: {used})", tail)  # fmt: skip
    report = ["experiment_comparison.csv", "experiment_comparison.md", "experiment_comparison.json",
              "experiment_comparison.png", "training_curves.png"]  # fmt: skip
    missing = [f for f in report if not (runs / f).is_file()]
    _require(not missing, f"report files missing: {', '.join(missing)}", tail)
    for name, summary in (("quickstart_teacher", teacher), ("quickstart_distill", student)):
        export = summary.get("export") or {}  # written by the training process itself (--export_onnx)
        _require(export.get("ok") is True, f"{name}: summary.json export record {export}", tail)
        _require(str(export.get("scored_on", "")).startswith(ctx.device),
                 f"{name}: the export was scored on {export.get('scored_on')!r}, not on {ctx.device}", tail)  # fmt: skip
    meta = _read_json(student_dir / "checkpoints" / "best_model.onnx.json")
    _require(meta.get("parity_ok") is True, f"ONNX parity failed: {meta.get('parity')}", tail)
    acc = meta.get("accuracy") or {}
    metric = acc.get("metric", "target_iou")
    onnx_score = _number((acc.get("onnx") or {}).get(metric))
    torch_score = _number((acc.get("pytorch") or {}).get(metric))
    _require(onnx_score is not None and torch_score is not None,
             f"best_model.onnx.json has no scored accuracy section: {acc}", tail)  # fmt: skip
    _require(abs(onnx_score - torch_score) <= 0.02,
             f"ONNX {metric} {onnx_score:.4f} differs from PyTorch {torch_score:.4f} by more than 0.02", tail)  # fmt: skip
    int8 = meta.get("int8") or {}
    int8_score = _number(int8.get("int8_value"))
    _require(int8_score is not None, f"best_model.onnx.json has no scored int8 section: {list(int8)}", tail)
    # An accepted INT8 model becomes best_model.onnx (the FP32 one is kept as fp32_file); `file` is its name now.
    int8_file = student_dir / "checkpoints" / str(int8.get("file") or int8.get("onnx_file") or "")
    _require(int8_file.is_file(), f"INT8 model {int8_file} missing", tail)
    if int8.get("accepted"):
        fp32 = student_dir / "checkpoints" / str(meta.get("fp32_file") or "")
        _require(fp32.is_file(), f"INT8 shipped but the FP32 model {fp32} is missing", tail)
    best_target = _number((student.get("final_metrics") or {}).get("target_iou"))
    ctx.shared["student_run"] = student_dir
    ctx.shared["export_accuracy"] = acc
    return Outcome(
        f"student {metric} {torch_score:.3f}, ONNX {onnx_score:.3f}, INT8 {int8_score:.3f}",
        {"student_target_iou_final": best_target, "pytorch": torch_score, "onnx": onnx_score, "int8": int8_score,
         "int8_shipped": int8.get("accepted"), "accuracy_images": acc.get("images"), "exporter": meta.get("exporter"),
         "teacher_best_metric": teacher.get("best_metric"), "student_best_metric": student.get("best_metric"),
         "run_dir": str(student_dir)},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ 2. the KD step's modes
def _kd_settings(ctx: Context, amp: str, channels_last: bool, compile: bool) -> Any:
    """Small KD steps: B0 teacher and student (the mode is under test, not the teacher's size)."""
    from benchmarks.common import B0, BenchSettings

    return BenchSettings(
        device=ctx.device, batch_size=4 if ctx.cuda else 2, size=(128, 128) if ctx.cuda else (64, 64),
        teacher_encoder=B0, student_encoder=B0, amp=amp, channels_last=channels_last, compile=compile,
        base_config="quickstart_distill", rois_per_image=3, naive=False, peak_memory=False,
    )  # fmt: skip


def _params(trainer: Any) -> list[Any]:
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def _kd_steps(steps: Any, n: int, scaler_skips: int = 0) -> tuple[list[float], float]:
    """KD training steps (forward_backward + optimizer_step with the finiteness check) until `n` have trained;
    the losses and the median seconds per step. A non-finite loss, or a step skipped as non-finite, fails. A
    step the fp16 grad scaler skipped (its scale was too high for these gradients: it halves it and goes on,
    as at the start of any fp16 run) is allowed up to `scaler_skips` times."""
    import torch

    from benchmarks.common import Clock, median
    from kdlab.engine.batches import batch_to_device

    t, clock = steps.kd_trainer, Clock(steps.device)
    losses, times, trained, skipped = [], [], 0, 0
    while trained < n:
        clock.sync()
        start = time.perf_counter()
        out = t.forward_backward(batch_to_device(steps.raw, steps.device, steps.cfg.training.channels_last))
        norm = t.optimizer_step([out])
        clock.sync()
        times.append(time.perf_counter() - start)
        loss = float(out["loss"].detach().float())
        step = trained + skipped + 1
        _require(math.isfinite(loss), f"step {step}: loss {loss}")
        losses.append(loss)
        if norm is None and getattr(t, "skipped_by_scaler", False):
            skipped += 1
            _require(
                skipped <= scaler_skips,
                f"the grad scaler skipped {skipped} steps (scale {t.scaler.get_scale()})",
            )
            continue
        _require(
            norm is not None and bool(torch.isfinite(norm)),
            f"step {step}: skipped as non-finite (grad norm {norm})",
        )
        trained += 1
    return losses, median(times[1:] or times)


def _build_steps(ctx: Context, name: str, s: Any) -> Any:
    from benchmarks.common import quiet_logs
    from benchmarks.kd import ProjectSteps

    run_dir = ctx.out / "kd_steps" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with quiet_logs():
        return ProjectSteps(s, run_dir)


def _student_changed(before: list[Any], trainer: Any) -> bool:
    import torch

    return any(not torch.equal(a, p.detach()) for a, p in zip(before, _params(trainer), strict=True))


def kd_bf16(ctx: Context) -> Outcome:
    import torch

    steps = _build_steps(ctx, "bf16", _kd_settings(ctx, "bf16", channels_last=False, compile=False))
    t = steps.kd_trainer
    _require(t.amp_dtype == torch.bfloat16, f"training.amp=bf16 resolved to {t.amp_dtype}")
    _require(not t.scaler.is_enabled(), "bf16 must not use a grad scaler")
    before = [p.detach().clone() for p in _params(t)]
    losses, step_s = _kd_steps(steps, 3)
    _require(_student_changed(before, t), "the student's weights did not change over 3 bf16 steps")
    return Outcome(
        f"loss {losses[-1]:.3f}, {step_s * 1e3:.0f} ms/step", {"losses": losses, "step_ms": step_s * 1e3}
    )


def kd_fp16_scaler(ctx: Context) -> Outcome:
    """fp16 autocast with the GradScaler, and one step whose gradients are made inf: the scaler must skip it
    (no weight changes) and lower its scale; the steps after it train again."""
    import torch

    # kdlab refuses amp=fp16 on CPU (CPU autocast is bf16, and fp16 convolutions there take seconds): the CPU
    # analogue trains in fp32 with torch's CPU grad scaler set on the trainer, the same scaler code path
    steps = _build_steps(ctx, "fp16", _kd_settings(ctx, "fp16" if ctx.cuda else "off", False, False))
    t = steps.kd_trainer
    note = ""
    if ctx.cuda:
        _require(t.amp_dtype == torch.float16, f"training.amp=fp16 resolved to {t.amp_dtype} on CUDA")
        _require(t.scaler.is_enabled(), "training.amp=fp16 on CUDA did not enable the GradScaler")
    else:
        try:
            t.scaler = torch.amp.GradScaler("cpu")
        except Exception as exc:  # noqa: BLE001 - an older torch without a CPU scaler
            raise Skip(
                f"torch.amp.GradScaler('cpu') is not available in torch {torch.__version__}: {exc}"
            ) from None
        note = "CPU analogue: fp32 steps with torch.amp.GradScaler('cpu') on the trainer (kdlab refuses amp=fp16 on CPU)"
    n = 2
    losses, _ = _kd_steps(steps, n, scaler_skips=8)
    from kdlab.engine.batches import batch_to_device

    scale_before = float(t.scaler.get_scale())
    step_before = [p.detach().clone() for p in _params(t)]
    out = t.forward_backward(batch_to_device(steps.raw, steps.device, steps.cfg.training.channels_last))
    grad = next(p.grad for p in _params(t) if p.grad is not None)
    grad[(0,) * grad.dim()] = float("inf")
    global_step = t.state.global_step
    returned = t.optimizer_step([out])
    counted = t.state.global_step - global_step  # 0: the overflow step is no step (issue 26)
    scale_after = float(t.scaler.get_scale())
    _require(
        scale_after < scale_before,
        f"the grad scale did not drop after an inf gradient ({scale_before} -> {scale_after})",
    )
    _require(
        not _student_changed(step_before, t),
        "the step with an inf gradient changed the weights (not skipped)",
    )
    more, step_s = _kd_steps(steps, n, scaler_skips=8)
    _require(_student_changed(step_before, t), "the steps after the overflow did not change the weights")
    losses += more
    return Outcome(
        f"loss {losses[-1]:.3f}, scale {scale_before:g} -> {scale_after:g} on overflow",
        {"losses": losses, "scale_before_overflow": scale_before, "scale_after_overflow": scale_after,
         "step_ms": step_s * 1e3, "overflow_step_returned": None if returned is None else float(returned),
         "overflow_step_counted_as_steps": counted},
        note,
    )  # fmt: skip


def kd_channels_last(ctx: Context) -> Outcome:
    import torch

    steps = _build_steps(ctx, "channels_last", _kd_settings(ctx, "auto", channels_last=True, compile=False))
    t = steps.kd_trainer
    convs = [p for p in t.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    _require(bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs),
             "the student's conv weights are not channels_last")  # fmt: skip
    from kdlab.engine.batches import batch_to_device

    images = batch_to_device(steps.raw, steps.device, True)["images"]
    _require(
        images.is_contiguous(memory_format=torch.channels_last), "the batch's images are not channels_last"
    )
    before = [p.detach().clone() for p in _params(t)]
    losses, step_s = _kd_steps(
        steps, 3, scaler_skips=8
    )  # amp auto is fp16 (with its scaler) on pre-Ampere GPUs
    _require(_student_changed(before, t), "the student's weights did not change")
    amp = str(t.amp_dtype).replace("torch.", "") if t.amp_dtype else "off"
    return Outcome(f"loss {losses[-1]:.3f}, {step_s * 1e3:.0f} ms/step (amp {amp})",
                   {"losses": losses, "step_ms": step_s * 1e3, "amp": amp})  # fmt: skip


def kd_compile(ctx: Context) -> Outcome:
    if not ctx.cuda:
        raise Skip("needs CUDA: compiling the student and teacher on 2 CPU cores takes minutes")
    from kdlab.engine.compile import is_compiled

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler, compile_log = Keep(logging.WARNING), logging.getLogger("kdlab.engine.compile")
    compile_log.addHandler(handler)
    try:
        start = time.perf_counter()
        steps = _build_steps(ctx, "compile", _kd_settings(ctx, "auto", channels_last=True, compile=True))
        losses, _ = _kd_steps(steps, 2, scaler_skips=8)  # the first calls compile
        first_s = time.perf_counter() - start
        more, step_s = _kd_steps(steps, 4, scaler_skips=8)
    finally:
        compile_log.removeHandler(handler)
    for what, module in (("student", steps.kd_trainer.model), ("teacher", steps.teacher.model)):
        _require(
            is_compiled(module),
            f"the {what} fell back to eager: " + ("; ".join(dict.fromkeys(warnings)) or "no warning"),
        )
    losses += more
    return Outcome(f"loss {losses[-1]:.3f}, {step_s * 1e3:.0f} ms/step, compile+first steps {first_s:.0f} s",
                   {"losses": losses, "step_ms": step_s * 1e3, "compile_and_first_steps_s": first_s})  # fmt: skip


# ------------------------------------------------------------------------------------------- 3. torchrun
def process_group_evidence(text: str, backend: str, world_size: int) -> str | None:
    """The first log line showing a `backend` process group of `world_size` with rank 0, or None.

    Tolerant of wording ("DDP: rank 0 of 1 (nccl)", NCCL_DEBUG's "... rank 0 nranks 1 ... Init COMPLETE"),
    but a line must name the backend, rank 0 and the world size."""
    size = rf"(?:of|nranks|world[ _]?size)\W{{0,3}}{world_size}\b"
    for line in text.splitlines():
        low = line.lower()
        if re.search(rf"\b{backend}\b", low) and re.search(r"\brank\W{0,3}0\b", low) and re.search(size, low):
            return line.strip()
    return None


def torchrun(ctx: Context) -> Outcome:
    """One epoch of a tiny run under `python -m torch.distributed.run --nproc_per_node=1` (NCCL on CUDA, gloo on
    CPU), validation included; the log must show the process group (kdlab joins one under torchrun even for a
    single process: TORCHELASTIC_RUN_ID, src/kdlab/engine/distributed.py)."""
    backend, nproc = ("nccl", 1) if ctx.cuda else ("gloo", 1)
    runs = ctx.out / "torchrun"
    args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kdlab.cli.train",
            "--config", "quickstart_baseline", "--epochs", "1", "--batch_size", "4", "--output_dir", str(runs),
            "--device", ctx.device, "--no_progress", "--set", *ctx.people_set(16 if ctx.cuda else 8, 4)]  # fmt: skip
    child = ctx.child("torchrun", args, 240.0, ctx.env(NCCL_DEBUG="INFO") if ctx.cuda else None)
    child.check("torchrun")
    run_dir = runs / "quickstart_baseline"
    summary = check_run_dir(run_dir, ctx.device, child.tail())
    target = _number((summary.get("final_metrics") or {}).get("target_iou"))
    _require(
        target is not None,
        f"no validation metrics in summary.json: {summary.get('final_metrics')}",
        child.tail(),
    )
    log_text = child.output + "\n" + (run_dir / "logs" / "training_log.txt").read_text(errors="replace")
    evidence = process_group_evidence(log_text, backend, nproc)
    _require(
        evidence is not None,
        f"no sign of a {backend} process group of {nproc} in the logs: kdlab joins one only when "
        "distributed.launched_by_torchrun() is true (src/kdlab/engine/distributed.py: it must also hold for "
        "--nproc_per_node=1, where WORLD_SIZE is 1)",
        child.tail(),
    )
    if nproc > 1:
        _require(
            summary.get("world_size") == nproc,
            f"summary.json world_size {summary.get('world_size')}, expected {nproc}",
        )
    return Outcome(f"{backend} x{nproc}, val target IoU {target:.3f}",
                   {"backend": backend, "nproc": nproc, "evidence": evidence, "target_iou": target},
                   "" if ctx.cuda else "CPU analogue: gloo")  # fmt: skip


# ------------------------------------------------------------------------------------------- 4. the runner
HEADER = re.compile(
    r"^# kdlab runner: (?P<run>\S+) on (?P<where>\S+)(?: \(CUDA_VISIBLE_DEVICES=(?P<cvd>[^)]*)\))?"
)


def runner_header(log: Path) -> dict[str, str | None]:
    """The runner's first line of a child log: run name, slot ("cuda:1", "cpu#0") and CUDA_VISIBLE_DEVICES."""
    try:
        first = log.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        raise CheckFailed(f"{log} is missing or empty") from None
    m = HEADER.match(first)
    if m is None:
        raise CheckFailed(f"{log}: first line is not the runner's header: {first!r}")
    return m.groupdict()


def runner_gpus(ctx: Context) -> Outcome:
    """Two runs side by side: `--gpus all` on CUDA (`--parallel 2` on CPU); each child's log says where it ran."""
    runs = ctx.out / "runner"
    place = ["--gpus", "all"] if ctx.cuda else ["--parallel", "2"]
    args = [str(ROOT / "run_experiments.py"), "--configs", "quickstart_baseline", "--seeds", "1", "2",
            "--epochs", "1", "--batch_size", "4", "--output_dir", str(runs), "--device", ctx.device, "--no_export",
            *place, "--set", *ctx.people_set(16 if ctx.cuda else 8, 4)]  # fmt: skip
    child = ctx.child("runner_gpus", args, 240.0)
    child.check("run_experiments.py " + " ".join(place))
    placed = {}
    for seed in (1, 2):
        name = f"quickstart_baseline__seed-{seed}"
        run_dir = runs / name
        check_run_dir(run_dir, ctx.device, child.tail())
        head = runner_header(run_dir / "logs" / "stdout.txt")
        _require(head["run"] == name, f"{name}: the log header names {head['run']}")
        where = head["where"] or ""
        if ctx.cuda:
            _require(where.startswith("cuda:"), f"{name}: placed on {where!r}, not a GPU")
            _require(head["cvd"] is not None, f"{name}: the header has no CUDA_VISIBLE_DEVICES")
        else:
            _require(where.startswith("cpu#"), f"{name}: placed on {where!r}")
        log = (run_dir / "logs" / "stdout.txt").read_text(errors="replace")
        _require(re.search(rf"\bdevice {ctx.device}\b", log) is not None,
                 f"{name}: its log (logs/stdout.txt) does not say 'device {ctx.device}'")  # fmt: skip
        placed[name] = {"where": where, "cuda_visible_devices": head["cvd"]}
    slots = {p["where"] for p in placed.values()}
    if ctx.cuda:
        import torch

        if torch.cuda.device_count() > 1:
            _require(len(slots) == 2, f"with {torch.cuda.device_count()} GPUs both runs went to {slots}")
    else:
        _require(len(slots) == 2, f"--parallel 2: both runs went to {slots}")
    figure = ", ".join(f"seed {n[-1]}: {p['where']}" + (f" (CVD={p['cuda_visible_devices']})"
                                                       if p["cuda_visible_devices"] is not None else "")
                       for n, p in placed.items())  # fmt: skip
    return Outcome(figure, placed, "" if ctx.cuda else "CPU analogue: --parallel 2 instead of --gpus all")


PROBE = (
    "import json, torch\n"
    "p = torch.cuda.get_device_properties(0)\n"
    "print(json.dumps({'count': torch.cuda.device_count(), 'name': p.name, 'uuid': str(getattr(p, 'uuid', '')),"
    " 'pci': [getattr(p, k, None) for k in ('pci_domain_id', 'pci_bus_id', 'pci_device_id')]}))\n"
)


def _probe(ctx: Context, visible: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], env=ctx.env(CUDA_VISIBLE_DEVICES=visible), cwd=ctx.out,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def physical_devices(ctx: Context, *visible: str) -> list[dict[str, Any]]:
    """The physical GPU a process sees as cuda:0 under each CUDA_VISIBLE_DEVICES value (probes in parallel)."""
    procs = [_probe(ctx, v) for v in visible]
    out = []
    for v, proc in zip(visible, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise CheckFailed(f"no CUDA device under CUDA_VISIBLE_DEVICES={v}", stderr[-1500:])
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def pick_visible(env: dict[str, str], device_count: int, smi_uuids: list[str]) -> tuple[str, str]:
    """The CUDA_VISIBLE_DEVICES to start the runner under, and a note: the last GPU when there are several
    (of this process's own CUDA_VISIBLE_DEVICES when it has one), else the only GPU by UUID (or "0")."""
    parent = [e.strip() for e in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if len(parent) > 1:
        return parent[-1], f"the last of this process's CUDA_VISIBLE_DEVICES={','.join(parent)}"
    if len(parent) == 1:
        return parent[0], "this process's CUDA_VISIBLE_DEVICES (one device: a wrong mapping may go unseen)"
    if device_count > 1:
        return str(device_count - 1), f"the last of {device_count} GPUs"
    if smi_uuids:
        return smi_uuids[0], "single GPU, named by its UUID (one device: a wrong mapping may go unseen)"
    return "0", "single GPU and no nvidia-smi: index 0 (one device: a wrong mapping may go unseen)"


def _smi_uuids() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        text = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"UUID: ((?:GPU|MIG)-[0-9A-Za-z-]+)", text)


def runner_visible_devices(ctx: Context) -> Outcome:
    """The runner started under CUDA_VISIBLE_DEVICES naming one GPU: its child must land on that GPU."""
    if not ctx.cuda:
        raise Skip("needs CUDA")
    import torch

    visible, note = pick_visible(dict(os.environ), torch.cuda.device_count(), _smi_uuids())
    runs = ctx.out / "runner_visible"
    args = [str(ROOT / "run_experiments.py"), "--configs", "quickstart_baseline", "--epochs", "1",
            "--batch_size", "4", "--output_dir", str(runs), "--device", "cuda", "--no_export", "--gpus", "all",
            "--set", *ctx.people_set(16, 4)]  # fmt: skip
    child = ctx.child("runner_visible_devices", args, 180.0, ctx.env(CUDA_VISIBLE_DEVICES=visible))
    child.check(f"run_experiments.py --gpus all under CUDA_VISIBLE_DEVICES={visible}")
    run_dir = runs / "quickstart_baseline"
    check_run_dir(run_dir, "cuda", child.tail())
    head = runner_header(run_dir / "logs" / "stdout.txt")
    child_visible = head["cvd"]
    _require(child_visible is not None, "the child's log header has no CUDA_VISIBLE_DEVICES")
    given, got = physical_devices(ctx, visible, child_visible)
    same = (given["uuid"] and given["uuid"] == got["uuid"]) or (
        not given["uuid"] and given["pci"] == got["pci"]
    )
    _require(bool(same), f"runner given CUDA_VISIBLE_DEVICES={visible} ({given}) but its child got "
                         f"CUDA_VISIBLE_DEVICES={child_visible} ({got}): another GPU")  # fmt: skip
    return Outcome(f"given {visible} -> child {child_visible}: same GPU",
                   {"given": visible, "child": child_visible, "device": given}, note)  # fmt: skip


# ------------------------------------------------------------------------------------------- 5. predict
def predict_pth(ctx: Context) -> Outcome:
    """`python -m kdlab.cli.predict` with item 1's best_model.pth on the device, on its validation images."""
    from kdlab.config.loader import validate_config
    from kdlab.data.loaders import resolve_data_paths

    run_dir: Path = ctx.shared["student_run"]
    cfg = validate_config(_read_json(run_dir / "config.json"), where=str(run_dir / "config.json"))
    paths = resolve_data_paths(cfg.data, generate=False)
    out = ctx.out / "predict"
    args = ["-m", "kdlab.cli.predict", "--model", str(run_dir / "checkpoints" / "best_model.pth"),
            "--images", str(paths.val_images), "--coco", str(paths.val_annotations), "--output", str(out),
            "--device", ctx.device, "--no_progress"]  # fmt: skip
    child = ctx.child("predict", args, 180.0)
    child.check("kdlab.cli.predict")
    results = _read_json(out / "predictions.json")
    _require(
        isinstance(results, list) and len(results) > 0, "predictions.json holds no results", child.tail()
    )
    first = results[0]
    _require({"image_id", "category_id", "segmentation", "score"} <= set(first)
             and isinstance(first["segmentation"].get("counts"), str),
             f"predictions.json entries are not COCO results: {sorted(first)}", child.tail())  # fmt: skip
    ran_on = str((_read_json(out / "images.json").get("info") or {}).get("device", ""))
    _require(ran_on.startswith(ctx.device), f"images.json says the .pth ran on {ran_on!r}, not {ctx.device}",
             child.tail())  # fmt: skip
    metrics = (_read_json(out / "metrics.json").get("metrics")) or {}
    target = _number(metrics.get("target_iou"))
    _require(
        target is not None and 0.0 <= target <= 1.0, f"metrics.json target_iou {metrics.get('target_iou')}"
    )
    values: dict[str, Any] = {"rois": len(results), "images": metrics.get("images"), "target_iou": target,
                              "miou": metrics.get("miou"), "device": ran_on}  # fmt: skip
    export = ctx.shared.get("export_accuracy") or {}
    exported = _number((export.get("pytorch") or {}).get("target_iou"))
    if exported is not None and export.get("images") == metrics.get("images"):
        values["export_pytorch_target_iou"] = exported
        _require(abs(target - exported) <= 0.05, f"predict's target IoU {target:.4f} is far from the export's "
                 f"PyTorch score {exported:.4f} on the same images")  # fmt: skip
    return Outcome(f"{len(results)} ROIs, target IoU {target:.3f}", values)


# ------------------------------------------------------------------------------------------- 6. throughput
SPEEDUP_GOAL, BUSY_GOAL = 3.0, 0.9


def throughput(ctx: Context) -> Outcome:
    """The KD step against the naive loop at the seed sizes (640x640, batch 16, B3 -> B0) and the GPU-busy
    fraction of the loader-fed loop; goals >= 3x and >= 90 %. On CPU: tiny sizes, figures only."""
    from benchmarks.common import B0, BenchSettings, defaults_for, quiet_logs
    from benchmarks.kd import run_kd_suite

    if ctx.cuda:
        s = defaults_for("cuda")
        s.reps, s.warmup = 5, 2
    else:
        s = BenchSettings(device="cpu", batch_size=2, size=(64, 64), teacher_encoder=B0, reps=1, warmup=0,
                          peak_memory=False)  # fmt: skip
    with quiet_logs():
        kd = run_kd_suite(s)
    speedup = float(kd["speedup_vs_naive"])
    values: dict[str, Any] = {
        "size": list(s.size), "batch_size": s.batch_size, "teacher": s.teacher_encoder, "student": s.student_encoder,
        "amp": kd.get("amp"), "kd_images_per_sec": kd["project_images_per_sec"],
        "naive_images_per_sec": kd["naive_images_per_sec"], "speedup_vs_naive": speedup,
        "kd_over_student_plus_teacher": kd["kd_over_student_plus_teacher"], "speedup_goal": SPEEDUP_GOAL,
    }  # fmt: skip
    if not ctx.cuda:
        return Outcome(f"{speedup:.2f}x naive ({kd['project_images_per_sec']:.1f} img/s); goals not judged on CPU",
                       values, "CPU analogue at 64x64, batch 2, B0 -> B0: figures only; GPU-busy needs CUDA")  # fmt: skip
    s.workers = (min(8, os.cpu_count() or 1),)
    s.data_images = 128
    busy = fed_busy_fraction(s, ctx.out / "throughput")
    values.update({"gpu_busy_fraction": busy, "busy_goal": BUSY_GOAL, "loader_workers": s.workers[0],
                   "fed_loop_images": s.data_images})  # fmt: skip
    figure = f"{speedup:.2f}x naive, GPU busy " + (f"{busy:.0%}" if busy is not None else "n/a")
    missed = []
    if speedup < SPEEDUP_GOAL:
        missed.append(f"speedup_vs_naive {speedup:.2f} < {SPEEDUP_GOAL}")
    if busy is None or busy < BUSY_GOAL:
        missed.append(f"gpu_busy_fraction {busy} < {BUSY_GOAL}")
    if missed:
        raise CheckFailed("goal missed: " + "; ".join(missed), figure=figure, values=values)
    return Outcome(figure, values)


def fed_busy_fraction(s: Any, work: Path) -> float | None:
    """GPU-busy fraction (benchmarks.data.gpu_busy_fraction: union of CUDA kernel time over wall time) of one
    epoch of the KD step fed by the real training loader over `s.data_images` synthetic images, after a warm
    epoch. The wait for an epoch's first batch (the workers restart) is taken before the measured region: on
    a short epoch it would weigh far more than in a real one."""
    import itertools

    from benchmarks.common import experiment_config, quiet_logs
    from benchmarks.data import gpu_busy_fraction
    from benchmarks.kd import ProjectSteps
    from kdlab.data.loaders import build_datasets, build_loader, raise_if_data_error
    from kdlab.engine.batches import batch_to_device

    work.mkdir(parents=True, exist_ok=True)
    h, w = s.size
    synthetic = {"root": str(work / "synthetic"), "train_images": s.data_images, "val_images": 2,
                 "image_size": [h, w], "seed": 0}  # fmt: skip
    data = {"train_annotations": None, "train_images": None, "val_annotations": None, "val_images": None,
            "synthetic": synthetic, "max_train_images": None}  # fmt: skip
    with quiet_logs():
        train_set, _ = build_datasets(experiment_config(s, data=data))
        loader = build_loader(
            train_set,
            s.batch_size,
            shuffle=True,
            seed=0,
            num_workers=s.workers[0],
            pin_memory=s.device == "cuda",
        )
        steps = ProjectSteps(s, work)
    trainer, channels_last = steps.kd_trainer, steps.cfg.training.channels_last

    def epoch(measure: bool) -> Any:
        batches = iter(loader)
        first = next(batches)

        def loop() -> None:
            for raw in itertools.chain([first], batches):
                raise_if_data_error(raw)
                if raw is not None:
                    trainer.forward_backward(batch_to_device(raw, steps.device, channels_last))
                    trainer.optimizer_step()

        return gpu_busy_fraction(loop) if measure else loop()

    try:
        epoch(measure=False)  # warm: workers started, every batch shape seen once
        return epoch(measure=True)
    finally:
        loader = None  # the last reference: its persistent workers stop


def items_for(device: str) -> list[Item]:
    """The items in the order they run (the same list on CPU and CUDA; sizes and analogues differ)."""
    return [
        Item("quickstart", "teacher + distilled student (2 epochs) via run_experiments.py, ONNX export scored, INT8",
             quickstart),
        Item("kd_bf16", "KD step with training.amp=bf16: finite losses, weights move", kd_bf16),
        Item("kd_fp16_scaler", "KD step with amp=fp16 + GradScaler; a forced inf-gradient step is skipped and "
             "lowers the scale", kd_fp16_scaler),
        Item("kd_channels_last", "KD step with channels_last weights and batch", kd_channels_last),
        Item("kd_compile", "KD step with training.compile=true, no eager fallback", kd_compile),
        Item("torchrun", "torch.distributed.run, 1 epoch with validation; NCCL process group in the log", torchrun),
        Item("runner_gpus", "run_experiments.py --gpus all with two runs; each child's device from its log",
             runner_gpus),
        Item("runner_visible_devices", "runner under CUDA_VISIBLE_DEVICES: the child lands on the same GPU",
             runner_visible_devices),
        Item("predict_pth", "python -m kdlab.cli.predict with the student's best_model.pth: COCO results, metrics",
             predict_pth, needs=("quickstart",)),
        Item("throughput", "KD step vs naive loop (>= 3x) and GPU-busy fraction (>= 90 %) at 640², B16, B3 -> B0",
             throughput),
    ]  # fmt: skip
