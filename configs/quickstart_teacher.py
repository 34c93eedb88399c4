"""Quickstart teacher: B3 on a generated synthetic people dataset, sized to train on a 2-core CPU in minutes."""

BASE = "people_b3_teacher"

CONFIG = {
    "description": "Small B3 teacher on embedded synthetic people (CPU-friendly)",
    "model": {
        "roi_size": [32, 24],
        "mask_size": [64, 48],
        "head_channels": 32,
    },
    "data": {
        "train_annotations": None,
        "train_images": None,
        "val_annotations": None,
        "val_images": None,
        "synthetic": {"train_images": 96, "val_images": 24, "image_size": [192, 192], "seed": 0},
        "input_size": [192, 192],
        "min_box_size": 8,
        "num_workers": 1,
    },
    "training": {
        "epochs": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_epochs": 0.5,
        "save_every": 2,
        "log_every_steps": 4,
    },
}
