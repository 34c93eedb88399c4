"""Student baseline: the B3 teacher's recipe with an EfficientNet-B0 encoder, trained without a teacher."""

BASE = "people_b3_teacher"

CONFIG = {
    "description": "People segmentation student (B0) without distillation, same sizes and schedule",
    "model": {"encoder": "timm-efficientnet-b0"},
}
