"""Quickstart student baseline: B0 on the same synthetic data as quickstart_teacher, on the students' schedule.

The students train 6 epochs (the teacher 10): baseline and distilled student share this schedule, the seed and
so the same initial weights and data order, which makes their difference a paired comparison.
"""

BASE = "quickstart_teacher"

CONFIG = {
    "description": "Small B0 student without distillation on embedded synthetic people (6 epochs)",
    "model": {"encoder": "timm-efficientnet-b0"},
    "training": {"epochs": 6},
}
