"""Quickstart pretrained distillation: the ImageNet Lite0 student learns from the ImageNet Lite2 teacher."""

BASE = "quickstart_pretrained_baseline"

CONFIG = {
    "description": "ImageNet-pretrained Lite0 student distilled from quickstart_pretrained_teacher (T=4, alpha=0.7)",
    "distillation": {
        "enabled": True,
        "teacher_experiment": "quickstart_pretrained_teacher",
        "temperature": 4.0,
        "alpha": 0.7,
        "grad_share_every": 32,  # as quickstart_distill: once per epoch (256 images / batch 8)
    },
}
