"""Sequence distillation: the baseline GRU student matches sequence_teacher's output trajectory (alpha=0.7)."""

BASE = "sequence_student_baseline"

CONFIG = {
    "description": "GRU 16x1 student distilled from sequence_teacher (trajectory MSE + CE, alpha=0.7)",
    "distillation": {
        "enabled": True,
        "teacher_experiment": "sequence_teacher",
        "alpha": 0.7,
        "grad_share_every": 10,
    },
}
