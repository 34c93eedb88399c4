"""Quickstart distillation: B0 learns from the quickstart B3 teacher on the same synthetic data and schedule."""

BASE = "quickstart_baseline"

CONFIG = {
    "description": "Small B0 student distilled from quickstart_teacher (T=4, alpha=0.7)",
    "distillation": {
        "enabled": True,
        "teacher_experiment": "quickstart_teacher",
        "temperature": 4.0,
        "alpha": 0.7,
        "grad_share_every": 32,  # once per quickstart epoch (256 images / batch 8): each measurement costs one backward per term
    },
}
