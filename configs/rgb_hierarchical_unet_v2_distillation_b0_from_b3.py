"""Alias of people_b0_from_b3: the B0 student distilled from the B3 teacher alias, at the seed sizes.

Kept for the commands users already have. Its teacher is the teacher alias
rgb_hierarchical_unet_v2_fullimage_pretrained_peopleseg_r80x60m160x120_disttrans_contdet_baware (a run of
that name in the same output_dir, or --teacher_checkpoint); its baseline in the report is `baseline`.
"""

BASE = "people_b0_from_b3"

CONFIG = {
    "description": "Alias of people_b0_from_b3 (B0 distilled from the B3 teacher alias, seed sizes)",
    "distillation": {
        "teacher_experiment": "rgb_hierarchical_unet_v2_fullimage_pretrained_peopleseg_r80x60m160x120_disttrans_contdet_baware"
    },
}
