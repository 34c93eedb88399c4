"""Methods suite (c): DIST (Huang et al., NeurIPS 2022) on the 3-class ROI logits instead of the KL terms.

Same schedule, seed and initial weights as quickstart_baseline; alpha 0.7 as the other methods.
"""

BASE = "quickstart_distill"

CONFIG = {
    "description": "B0 from quickstart_teacher: DIST on the ROI logits (tau=1, beta=gamma=1), no KL",
    "distillation": {
        "final_weight": 0.0,
        "bg_fg_weight": 0.0,
        "target_weight": 0.0,
        "dist_weight": 1.0,
        "dist_beta": 1.0,
        "dist_gamma": 1.0,
        "dist_temperature": 1.0,
    },
}
