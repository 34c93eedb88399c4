"""Run a trained or exported people model on images: masks (COCO results), overlay pictures and, with
ground truth, the trainer's metrics. The command is `kdlab-predict` (kdlab.cli.predict); see docs/predict.md."""

from kdlab.predict.run import PredictRequest, PredictResult, predict

__all__ = ["PredictRequest", "PredictResult", "predict"]
