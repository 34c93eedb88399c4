"""Alias of people_b0_baseline: the B0 student alone at the seed sizes (640x640, ROI 80x60, mask 160x120).

Kept for the commands users already have (`--config baseline`); the report pairs it with the distilled
alias rgb_hierarchical_unet_v2_distillation_b0_from_b3 as its baseline (same encoder, no teacher).
"""

BASE = "people_b0_baseline"

CONFIG = {"description": "Alias of people_b0_baseline (B0 student without distillation, seed sizes)"}
