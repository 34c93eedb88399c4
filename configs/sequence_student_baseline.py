"""Sequence student baseline: a 1-layer GRU (hidden 16) on the same data, trained without a teacher."""

BASE = "sequence_teacher"

CONFIG = {
    "description": "GRU 16x1 student on synthetic sequences, no distillation",
    "model": {"hidden_size": 16, "num_layers": 1},
    "training": {"lr": 1e-2},
}
