"""Digits distillation: the baseline student learns from digits_teacher (KL at T=4 + CE, alpha=0.7)."""

BASE = "digits_student_baseline"

CONFIG = {
    "description": "MobileNetV3-small student on 300 digits, distilled from digits_teacher (T=4, alpha=0.7)",
    "distillation": {
        "enabled": True,
        "teacher_experiment": "digits_teacher",
        "temperature": 4.0,
        "alpha": 0.7,
        "grad_share_every": 10,
    },
}
