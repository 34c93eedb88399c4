"""Distilled student: B0 learns from the B3 teacher (T=4, alpha=0.7, lr 1e-4) on the seed's schedule."""

BASE = "people_b0_baseline"

CONFIG = {
    "description": "B0 student distilled from the people_b3_teacher run (T=4, alpha=0.7)",
    "training": {"lr": 1e-4},
    "distillation": {
        "enabled": True,
        "teacher_experiment": "people_b3_teacher",
        "temperature": 4.0,
        "alpha": 0.7,
    },
}
