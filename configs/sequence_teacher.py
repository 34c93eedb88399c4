"""Sequence teacher: a 2-layer GRU (hidden 128) on the synthetic 8-class sequence task (48 steps, 8 channels)."""

CONFIG = {
    "description": "GRU 128x2 teacher on synthetic sequences (T=48, D_in=8, 8 classes), CPU-sized",
    "task": "sequence",
    "model": {"name": "gru", "hidden_size": 128, "num_layers": 2, "num_classes": 8},
    "data": {
        "sequence": {
            "source": "synthetic",
            "path": "data/generated/synthetic_sequences.hdf5",
            "input_dim": 8,
            "seq_len": 48,
            "train_samples": 2000,
            "val_samples": 1000,
            "noise": 1.0,
            "seed": 0,
        },
        "num_workers": 0,
    },
    "training": {
        "epochs": 15,
        "batch_size": 64,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 1.0,
        "save_every": 5,
        "log_every_steps": 10,
        "num_vis_images": 0,
        "channels_last": False,
    },
}
