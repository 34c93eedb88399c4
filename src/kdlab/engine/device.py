"""Which device and mixed-precision dtype a run uses ("auto" resolves here, once)."""

from __future__ import annotations

import inspect
import logging
import os
import platform
import socket
from typing import Any

import torch

from kdlab.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA device is available (use --device cpu or auto)"
        )
    return torch.device(name)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True where the GPU computes in bf16 natively (Ampere, compute capability 8.0, and newer; ROCm).

    `torch.cuda.is_bf16_supported()` alone also says yes where bf16 is only emulated (V100, T4): much slower
    than fp16 there. Newer torch answers the native question with `including_emulation=False`; older torch
    is asked through the device's compute capability."""
    try:
        has_keyword = "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters
    except (TypeError, ValueError):  # a signature torch does not expose
        has_keyword = False
    if has_keyword:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: `auto` is bf16 on a CUDA device with native bf16, fp16 (with the trainer's
    grad scaler) on older GPUs, off elsewhere; `bf16`/`fp16`/`off` are taken as given. fp16 on the CPU is
    refused (ConfigError) rather than silently replaced: CPU autocast is a bf16 feature."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type == "cpu":
            raise ConfigError(
                "training.amp=fp16 needs a CUDA device but this run is on cpu; "
                "set training.amp=bf16 (CPU autocast), off, or auto (off on cpu)"
            )
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return None


def set_up_determinism(device: torch.device) -> int:
    """`training.deterministic=true`: deterministic algorithms, oneDNN's deterministic mode, and an explicit
    CPU thread count; returns that count (recorded as `threads` in summary.json's provenance).

    On the CPU a run is bit-reproducible only at one thread count: a reduction split over N threads adds in
    another order than over M (the crash test's model gives other gradients from step 1 with 1 and 2
    threads). The count is the one torch chose at start-up (OMP_NUM_THREADS / MKL_NUM_THREADS when set, as
    the runner does for its children; else one per physical core), now set explicitly, which also turns off
    MKL's dynamic choice of fewer threads, so OpenMP, MKL and oneDNN all use exactly this many.
    On CUDA some kernels have no deterministic version (the backward of torchvision's ROI Align and of
    bilinear upsampling, both in the people model): torch warns about them (warn_only) instead of stopping
    the run, so a CUDA run is not guaranteed bit-exact."""
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; read when its handle is made (first matmul)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if hasattr(torch.backends, "mkldnn") and hasattr(torch.backends.mkldnn, "deterministic"):
        torch.backends.mkldnn.deterministic = True
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def check_resume_threads(recorded: object, threads: int, where: object) -> None:
    """Warn when a deterministic run is resumed with another CPU thread count than it was trained with
    (`recorded`, None when unknown): it continues, but no longer bit-identical to an uninterrupted run."""
    if isinstance(recorded, int) and recorded != threads:
        log.warning(
            "%s was trained with %d CPU threads and this process has %d: the resumed run continues but is not "
            "bit-identical to an uninterrupted one; resume with OMP_NUM_THREADS=%d (run_experiments.py: "
            "--threads_per_run %d) for an exact resume",
            where, recorded, threads, recorded, recorded,
        )  # fmt: skip


def device_name(device: torch.device) -> str:
    """The hardware behind `device`: the GPU's name, or the CPU's model name (Linux) / platform string."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """What a run's numbers depend on besides its config: versions, hardware, threads, mixed precision.
    Written into summary.json; the report names what differs between the runs of one table."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "host": socket.gethostname(),
    }
