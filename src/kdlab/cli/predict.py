"""`kdlab-predict` (also `python -m kdlab.predict`): run a people model on images, write masks and pictures.

kdlab-predict --model RUN/checkpoints/best_model.onnx --images FOLDER_OR_FILES...
              (--coco instances.json | --boxes boxes.json | --whole_image) [--output predictions/]
"""

from __future__ import annotations

from pathlib import Path

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="kdlab-predict",
        description="Run a kdlab people-segmentation model (best_model.onnx or .pth) on images; write COCO "
        "results, overlay PNGs and, with --coco, the trainer's metrics. See docs/predict.md.",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="a run's checkpoints/best_model.onnx or best_model.pth"
    )
    p.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="one image folder, or image files"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--coco", type=Path, help="COCO instances JSON: its person boxes (and ground truth for metrics)"
    )
    source.add_argument(
        "--boxes", type=Path, help="JSON {file_name: [[x1, y1, x2, y2], ...]} in original-image pixels"
    )
    source.add_argument("--whole_image", action="store_true", help="one box covering each whole image")
    p.add_argument(
        "--output", type=Path, default=Path("predictions"), help="output folder (default predictions/)"
    )
    p.add_argument("--batch_size", type=int, default=4, help="images per model call (default 4)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="for a .pth model (ONNX runs on CPU)",
    )
    p.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--no_overlays", action="store_true", help="skip the overlay PNGs")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--verbose", action="store_true", help="log at DEBUG level (more detail from kdlab's own loggers)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from kdlab.predict.run import PredictRequest, metrics_table, predict

    result = predict(
        PredictRequest(
            model=args.model, images=list(args.images), output=args.output, coco=args.coco, boxes=args.boxes,
            whole_image=args.whole_image, batch_size=args.batch_size, device=args.device,
            num_workers=args.num_workers, overlays=not args.no_overlays, show_progress=not args.no_progress,
        )
    )  # fmt: skip
    print(f"{result.num_rois} ROIs on {result.num_images} images -> {result.output}")
    if result.metrics is not None:
        print(metrics_table(result.metrics))
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
