"""kdlab: knowledge-distillation experiment runner for people instance segmentation."""

__version__ = "0.1.0"
