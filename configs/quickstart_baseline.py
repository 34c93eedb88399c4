"""Quickstart student baseline: B0 on the same synthetic data and schedule as quickstart_teacher."""

BASE = "quickstart_teacher"

CONFIG = {
    "description": "Small B0 student without distillation on embedded synthetic people",
    "model": {"encoder": "timm-efficientnet-b0"},
}
