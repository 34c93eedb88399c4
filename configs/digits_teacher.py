"""Digits teacher: a timm ResNet-18 on scikit-learn's handwritten digits (upsampled to 32x32), CPU-sized."""

CONFIG = {
    "description": "ResNet-18 classifier teacher on the embedded sklearn digits (32x32, 10 classes)",
    "task": "classification",
    "model": {"name": "resnet18", "num_classes": 10},
    "data": {
        "classification": {"source": "digits", "image_size": 32, "val_fraction": 0.25, "split_seed": 0},
        "num_workers": 0,
    },
    "training": {
        "epochs": 12,
        "batch_size": 64,
        "lr": 3e-3,
        "weight_decay": 5e-4,
        "warmup_epochs": 0.5,
        "save_every": 4,
        "log_every_steps": 10,
        "num_vis_images": 0,
    },
}
