"""Fast-student suite: which model knobs make the B0 student at most half the B3 teacher's ONNX CPU latency.

B0 and B3 share the decoder and the ROI head, which dominate at the seed sizes, so a smaller encoder alone
gives only ~0.75x the teacher's time. Every candidate here is the `student_config` model (default
people_b0_from_b3: ROI 80x60, mask 160x120) with a few `model.*` changes, random-init (latency does not
depend on the weights), exported with the project's exporter and timed in onnxruntime (CPU) interleaved with
the teacher on one image and `rois_per_image` ROIs. Each model is also timed with 0 ROIs, which leaves the
full-image UNet alone, so `head_ms = with ROIs - without` is the RoIAlign + ROI head's share. MACs are
counted per part (encoder, decoder + segmentation head, ROI head) with torch's FlopCounterMode.
"""

from __future__ import annotations

import tempfile
from math import nan
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import BenchSettings, Clock, interleaved, median, synthetic_batch
from kdlab.config.loader import named_config_dict, validate_config
from kdlab.config.schema import ExperimentConfig, ModelConfig
from kdlab.export.segmentation import OUTPUT_NAMES, export_model_to_onnx
from kdlab.models.builders import build_model
from kdlab.models.roi_unet import RoiUNet, count_parameters

TEACHER_CONFIG = "people_b3_teacher"
STUDENT_CONFIG = "people_b0_from_b3"
SMALL_DECODER = (128, 64, 32, 16, 8)  # every smp UNet decoder stage at half the default width
TINY_DECODER = (64, 32, 16, 16, 8)

# name -> `model.*` changes on the student config. "b0" is the unchanged student, the reference row.
CANDIDATES: dict[str, dict[str, Any]] = {
    "b0": {},
    "dec128": {"decoder_channels": SMALL_DECODER},
    "dec64": {"decoder_channels": TINY_DECODER},
    "feat8": {"feature_channels": 8},
    "head48": {"head_channels": 48},
    "head32": {"head_channels": 32},
    "depth2": {"head_depth": 2},
    "roi40x30": {"roi_size": (40, 30)},
    "dec128+feat8": {"decoder_channels": SMALL_DECODER, "feature_channels": 8},
    "dec128+head48": {"decoder_channels": SMALL_DECODER, "head_channels": 48},
    "dec128+head32": {"decoder_channels": SMALL_DECODER, "head_channels": 32},
    "dec64+head48": {"decoder_channels": TINY_DECODER, "head_channels": 48},
}


def model_config(config_name: str, changes: dict[str, Any]) -> ModelConfig:
    """The named config's model section with `changes`, re-validated (a bad knob fails here, not in export)."""
    cfg = validate_config(named_config_dict(config_name), where=f"fast_student {config_name}")
    data = cfg.model.model_dump(mode="json")
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
    data["encoder_weights"] = None
    return ModelConfig.model_validate(data)


def macs_by_part(model: RoiUNet, size: tuple[int, int], rois: torch.Tensor) -> dict[str, float]:
    """GMACs of one image through the encoder, the decoder + segmentation head and the ROI part (the rest).

    MACs = FLOPs / 2 of convolutions and matmuls (FlopCounterMode), on the meta device: shapes only, fast."""
    meta = torch.device("meta")
    model = model.to(meta)
    x = torch.rand(1, 3, *size, device=meta)

    def gmacs(fn: Any) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fn()
        return counter.get_total_flops() / 2e9

    features = model.unet.encoder(x)
    encoder = gmacs(lambda: model.unet.encoder(x))
    decoder = gmacs(lambda: model.unet.segmentation_head(model.unet.decoder(features)))
    total = gmacs(lambda: model(x, rois.to(meta)))
    return {"encoder": encoder, "decoder": decoder, "roi_head": total - encoder - decoder, "total": total}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(s: BenchSettings, cfg: ExperimentConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One image with `rois_per_image` ROIs, and the same image with none (the full-image UNet alone)."""
    raw = synthetic_batch(s, cfg)
    images = (raw["images"].float() / 255.0).numpy()
    with_rois = {"images": images, "rois": np.ascontiguousarray(raw["rois"].numpy())}
    return with_rois, {"images": images, "rois": np.zeros((0, 5), dtype=np.float32)}


def latency_at(
    s: BenchSettings, size: tuple[int, int], candidates: dict[str, dict[str, Any]], threads: int
) -> dict[str, Any]:
    """Export the teacher and every candidate at `size`, time them interleaved (with and without ROIs)."""
    sized = BenchSettings(**{**s.__dict__, "size": tuple(size), "batch_size": 1})
    student_cfg = validate_config(named_config_dict(STUDENT_CONFIG), where="fast_student")
    with_rois, no_rois = _feeds(sized, student_cfg)
    rois = torch.from_numpy(with_rois["rois"])
    models = {"teacher": model_config(TEACHER_CONFIG, {"encoder": s.teacher_encoder})}
    models.update({name: model_config(STUDENT_CONFIG, changes) for name, changes in candidates.items()})
    rows: dict[str, dict[str, Any]] = {}
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-fast-") as tmp:
        for name, mcfg in models.items():
            torch.manual_seed(0)
            model = build_model(mcfg).eval()
            path = Path(tmp) / f"{name.replace('+', '_')}.onnx"
            export_model_to_onnx(model, path, tuple(size), opset=student_cfg.export.opset)
            rows[name] = {
                "changes": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in candidates.get(name, {}).items()
                },
                "params_m": count_parameters(model) / 1e6,
                "onnx_mb": path.stat().st_size / 2**20,
                "gmacs": macs_by_part(model, tuple(size), rois),
            }
            sess = _session(path, threads)
            cases[name] = lambda sess=sess: sess.run(OUTPUT_NAMES, with_rois)
            cases[f"{name}/unet"] = lambda sess=sess: sess.run(OUTPUT_NAMES, no_rois)
        wall, cpu = interleaved(Clock(torch.device("cpu")), cases, s.onnx_runs, max(1, s.warmup))
    teacher_ms = median(wall["teacher"]) * 1e3
    for name, row in rows.items():
        full, unet = median(wall[name]) * 1e3, median(wall[f"{name}/unet"]) * 1e3
        row.update({"ms": full, "unet_ms": unet, "head_ms": full - unet, "over_teacher": full / teacher_ms})
        # One onnxruntime thread: process CPU time is the model's own work, which other jobs on a shared
        # machine stretch far less than wall time, so its ratio is the steadiest of the three.
        row["over_teacher_cpu_time"] = median(cpu[name]) / median(cpu["teacher"])
        row["wall_ms"] = [w * 1e3 for w in wall[name]]
        row["unet_wall_ms"] = [w * 1e3 for w in wall[f"{name}/unet"]]
        # The per-round ratio (same round, adjacent in time) is a steadier cross-check than the ratio of medians.
        row["over_teacher_per_round_median"] = median(
            [a / b for a, b in zip(wall[name], wall["teacher"], strict=True)]
        )
    return {"size": list(size), "rois": int(rois.shape[0]), "ort_threads": threads, "runs": s.onnx_runs,
            "teacher_ms": teacher_ms, "models": rows}  # fmt: skip


def run_fast_student_suite(
    s: BenchSettings, candidates: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Every candidate (or those named in `s.extra["fast_student_candidates"]`) at `s.size` and each of
    `s.onnx_sizes`; onnxruntime gets `s.threads` threads (default 1: on a shared machine one thread makes the
    ratios steadier than the all-core default)."""
    sizes = [tuple(s.size)] + [tuple(x) for x in s.onnx_sizes if tuple(x) != tuple(s.size)]
    threads = s.threads or 1
    chosen = CANDIDATES if candidates is None else candidates
    names = s.extra.get("fast_student_candidates")
    if names:
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            raise ValueError(f"unknown fast_student candidates {unknown}; known: {', '.join(CANDIDATES)}")
        chosen = {n: CANDIDATES[n] for n in names}
    return {"sizes": [latency_at(s, size, chosen, threads) for size in sizes]}


def fast_student_table(suite: dict[str, Any]) -> str:
    """Markdown: one row per model, latency / teacher and the UNet/head split at every size."""
    sizes = suite["sizes"]
    head = "| model | params (M) | GMACs (enc / dec / head) | " + " | ".join(
        f"{r['size'][0]}² ms (UNet + head) | {r['size'][0]}² / teacher (medians, per round, CPU time)"
        for r in sizes
    )
    lines = [head + " |", "|---" * (3 + 2 * len(sizes)) + "|"]
    for name in sizes[0]["models"]:
        first = sizes[0]["models"][name]
        g = first["gmacs"]
        cells = [
            name,
            f"{first['params_m']:.2f}",
            f"{g['encoder']:.1f} / {g['decoder']:.1f} / {g['roi_head']:.1f}",
        ]
        for r in sizes:
            m = r["models"][name]
            ratios = (
                m["over_teacher"],
                m["over_teacher_per_round_median"],
                m.get("over_teacher_cpu_time", nan),
            )
            cells += [
                f"{m['ms']:.0f} ({m['unet_ms']:.0f} + {m['head_ms']:.0f})",
                " / ".join(f"{x:.2f}" for x in ratios),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
