"""Sequence distillation: the baseline GRU student matches sequence_teacher's output trajectory (alpha=0.7),
offline: the teacher's trajectories are cached once (HDF5, <run>/teacher_cache.hdf5) and the student trains
from the file."""

BASE = "sequence_student_baseline"

CONFIG = {
    "description": "GRU 16x1 student distilled from sequence_teacher's cached trajectories (MSE + CE, alpha=0.7)",
    "distillation": {
        "enabled": True,
        "teacher_experiment": "sequence_teacher",
        "alpha": 0.7,
        "grad_share_every": 10,
        # Generated from the teacher experiment's best_model.pth on first use, reused afterwards.
        "cache": {"batch_size": 256},
    },
}
