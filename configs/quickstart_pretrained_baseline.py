"""Quickstart pretrained student baseline: ImageNet EfficientNet-Lite0, no distillation, the students' schedule.

Its encoder starts from weights/efficientnet-lite0.pth (`kdlab-weights import efficientnet-lite0`; imported
automatically when missing and the package is installed). Baseline and distilled student share this config's
seed, data order and so initial weights: their difference is a paired comparison.
"""

BASE = "quickstart_pretrained_teacher"

CONFIG = {
    "description": "ImageNet-pretrained EfficientNet-Lite0 student without distillation (6 epochs)",
    "model": {
        "encoder": "timm-tf_efficientnet_lite0",
        "encoder_weights": "weights/efficientnet-lite0.pth",
    },
    "training": {"epochs": 6},
}
