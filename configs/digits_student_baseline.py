"""Digits student baseline: a small timm MobileNetV3 trained on a 300-image subset without a teacher."""

BASE = "digits_teacher"

CONFIG = {
    "description": "MobileNetV3-small student on 300 digits, no distillation",
    "model": {"name": "mobilenetv3_small_100"},
    "data": {"classification": {"max_train_samples": 300}},
    "training": {"epochs": 30, "batch_size": 32, "save_every": 10},
}
