"""Distilled student from ImageNet: Lite0 learns from the Lite2 teacher (T=4, alpha=0.7, lr 1e-4), as
people_b0_from_b3 does for the random-init B0/B3 pair."""

BASE = "people_lite0_baseline"

CONFIG = {
    "description": "ImageNet-pretrained Lite0 student distilled from the people_lite2_teacher run (T=4, alpha=0.7)",
    "training": {"lr": 1e-4},
    "distillation": {
        "enabled": True,
        "teacher_experiment": "people_lite2_teacher",
        "temperature": 4.0,
        "alpha": 0.7,
    },
}
